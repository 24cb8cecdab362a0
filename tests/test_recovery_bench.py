"""benchmarks/experiments/recovery.py bookkeeping: which SGLP variant a table row names, and the cache keys that
let an interrupted run (or a run made before an option existed) reuse finished rows."""

from types import SimpleNamespace

import pytest

import benchmarks.experiments.recovery as R
import benchmarks.experiments.recovery_rows as RR


def _args(**kw):
    return SimpleNamespace(**{"protocol": "natural", "allocation": "auto", "grad_batches": 1, "k_budget": "raise", **kw})


def test_variants_name_protocol_and_allocation():
    assert R.method_variant("sglp", _args(), lm=False) == ("sglp", "natural", "proportional", {})
    assert R.method_variant("sglp", _args(), lm=True) == ("sglp", "natural", "redundancy", {"allocation": "redundancy"})
    assert R.method_variant("sglp-reference", _args(), lm=False)[:3] == ("sglp", "reference", "proportional")
    assert R.method_variant("sglp-proportional", _args(), lm=True) == ("sglp", "natural", "proportional", {})
    assert R.method_variant("block_influence", _args(allocation="redundancy"), lm=True) == \
        ("block_influence", "natural", "redundancy", {})  # baselines have no SGLP options in their key
    gb = R.method_variant("sglp", _args(grad_batches=4), lm=True)[3]
    assert gb == {"allocation": "redundancy", "grad_batches": 4} and R.row_suffix(gb) == "-redundancy-gb4"
    with pytest.raises(SystemExit, match="unknown SGLP variant"):
        R.method_variant("sglp-magic", _args(), lm=False)


def test_k_budget_variants_are_keyed_apart_and_old_rows_are_raise():
    # rows cached before --k-budget existed were made with k raised to fit the budget: no key
    assert R.method_variant("sglp-raise", _args(k_budget="search"), lm=False) == ("sglp", "natural", "proportional", {})
    b, p, a, extra = R.method_variant("sglp", _args(k_budget="search"), lm=False)
    assert extra == {"k_budget": "search"} and R.row_suffix(extra) == "-search"
    assert R.method_variant("sglp-search+heal", _args(), lm=False)[3] == {"k_budget": "search", "heal": "linear"}
    assert R.cache_key_method("sglp-raise") == R.cache_key_method("sglp-search+heal") == "sglp"
    assert R.method_variant("sleb", _args(k_budget="search"), lm=False)[3] == {}  # baselines have no k


def test_cached_rows_are_found_by_equal_settings_only(tmp_path):
    settings = {"model": "smollm2", "method": R.cache_key_method("sglp-proportional"), "steps": 20}
    assert settings["method"] == "sglp"  # rows from before the allocation option stay valid
    RR.save_row(str(tmp_path), settings, {"method": "sglp", "ppl": 83.15})
    assert RR.cached_row(str(tmp_path), settings) == {"method": "sglp", "ppl": 83.15}
    assert RR.cached_row(str(tmp_path), {**settings, "steps": 120}) is None
    assert RR.cached_row(str(tmp_path), {**settings, "allocation": "redundancy"}) is None


def test_heal_variants_are_keyed_apart_from_plain_rows():
    assert R.method_variant("block_influence+heal", _args(), lm=True) == ("block_influence", "natural", "redundancy",
                                                                   {"heal": "linear"})
    b, p, a, extra = R.method_variant("sglp+heal", _args(), lm=False)
    assert (b, p, a, extra) == ("sglp", "natural", "proportional", {"heal": "linear"}) and R.row_suffix(extra) == "-heal"
    assert R.cache_key_method("sglp-proportional+heal") == "sglp"


def test_summary_is_mean_and_sample_std_over_seeds_and_best_healing_setting_wins():
    rows = [{"method": m, "seed": s, "acc": a, "pruned_acc": p, "removed": []}
            for m, s, a, p in [("sglp", 0, 90.0, 10.0), ("sglp", 1, 92.0, 12.0), ("sglp+heal", 0, 93.0, 50.0),
                               ("sglp+heal", 1, 93.0, 52.0), ("sleb", 0, 91.0, 20.0), ("sleb", 1, 91.5, 22.0),
                               ("sleb+heal", 0, 91.2, 60.0), ("sleb+heal", 1, 91.6, 64.0),
                               ("sglp-reference", 0, 99.0, 0.0), ("sglp-reference", 1, 99.0, 0.0)]]
    stats = {s["method"]: s for s in RR.summarize(rows, "acc", "pruned_acc")}
    assert stats["sglp"]["mean"] == 91.0 and stats["sglp"]["std"] == pytest.approx(2 ** 0.5)
    assert stats["sglp"]["pruned"] == 11.0 and stats["sglp"]["seeds"] == [0, 1]
    sg, best = RR.headline(list(stats.values()), higher=True)
    assert sg["method"] == "sglp+heal"  # the variants (sglp-reference) are not the product's SGLP
    assert best["method"] == "sleb+heal" and best["mean"] == pytest.approx(91.4)
    sg, best = RR.headline(list(stats.values()), higher=False)  # perplexity: lower is better
    assert sg["method"] == "sglp" and best["method"] == "sleb"


def test_an_earlier_runs_pruned_model_is_reused_only_for_the_same_prune_settings(tmp_path):
    import json
    import shutil

    from sglp_edge.models.registry import SHIPPED
    from sglp_edge.pipeline.prune_job import PruneJob

    out = tmp_path / "mnv2-sleb-heal"
    shutil.copytree(SHIPPED["mobilenetv2"], out / "model")  # stands in for the pruned network
    plan = {"method": "sleb", "model_source": "mobilenetv2", "removed": ["features.3"], "macs_reduction": 0.1,
            "params_reduction": 0.2, "evaluations": 7, "heal": {"runs": []}, "k": None,
            "config": {"keep": 8, "method": "sleb", "protocol": "natural", "seed": 1, "heal": "linear",
                       "k_budget": "raise", "eval_budget": 80, "allocation": "proportional"}}
    (out / "plan.json").write_text(json.dumps(plan))
    job = PruneJob(model="mobilenetv2", out=out, keep=8, method="sleb", heal="linear", seed=1, protocol="loss")
    res = RR.reuse_pruned(job)  # a baseline does not read the protocol
    assert res is not None and res.plan.removed == ["features.3"] and res.plan.evaluations == 7
    assert sum(p.numel() for p in res.pruned.parameters()) > 0
    for other in ({"seed": 2}, {"heal": "none"}, {"keep": 9}, {"method": "block_influence"}, {"grad_batches": 4}):
        assert RR.reuse_pruned(PruneJob(**{**job.__dict__, **other})) is None, other
    plan.update(method="sglp", config={**plan["config"], "method": "sglp"})
    (out / "plan.json").write_text(json.dumps(plan))
    sglp = {**job.__dict__, "method": "sglp", "allocation": "proportional"}
    assert RR.reuse_pruned(PruneJob(**{**sglp, "protocol": "natural"})) is not None
    assert RR.reuse_pruned(PruneJob(**{**sglp, "protocol": "loss"})) is None  # SGLP's choice depends on it
    assert RR.reuse_pruned(PruneJob(**{**sglp, "protocol": "natural", "allocation": "redundancy"})) is None
