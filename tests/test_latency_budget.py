"""Depth pruning to a latency budget (``prune.keep: auto``): the additive latency model (fit, and
on a small CIFAR ResNet-20 timed by the real ONNX Runtime through the local Target), the search's
choice of the fewest removals, and ``sglp-edge run`` meeting a loose budget or ending with the
one-line "cannot be met" error."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmarks.board.errors import UserError

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")

#: short timed passes: these tests check the machinery, not figures
QUICK = {"warmup_s": 0.05, "min_iters": 10, "min_duration_s": 0.05}
CFG = {
    "name": "budget", "model": "cifar_resnet20", "data": "fashion-mnist",
    "prune": {"keep": "auto", "calib_batches": 1, "batch_size": 16, "latency_rounds": 2},
    "finetune": {"steps": 2, "batch_size": 16, "lr": 0.01},
    "eval": {"samples": 64, "calib_samples": 100},
    "export": {"simplify": "none"},
    "devices": ["local-cpu-ort"],
    "bench": {**QUICK, "batch_sizes": [1]},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded ResNet-20 checkpoint: one set of weights, so its latency model is measured once
    (test_latency_model_on_onnx_runtime) and the runs below find it in the cache."""
    from sglp_edge.models.registry import load_model, model_spec, save_checkpoint

    torch.manual_seed(0)
    loaded = load_model("cifar_resnet20")
    d = tmp_path_factory.mktemp("tiny") / "resnet20"
    save_checkpoint(loaded.model, loaded.adapter, d, spec=model_spec(loaded.adapter, loaded.model))
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One latency cache for this module: the model is measured once, later tests read it."""
    d = tmp_path_factory.mktemp("latency-cache")
    old = os.environ.get("SGLP_EDGE_CACHE")
    os.environ["SGLP_EDGE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SGLP_EDGE_CACHE", None)
    else:
        os.environ["SGLP_EDGE_CACHE"] = old


def test_additive_fit_recovers_unit_costs_from_noisy_timings():
    from sglp_edge.budget.latency_model import fit_additive, subset_design

    groups = [[f"a{i}" for i in range(5)], [f"b{i}" for i in range(4)], ["c0"]]
    cost = {**{u: 0.30 for u in groups[0]}, **{u: 0.55 for u in groups[1]}, "c0": 0.9}
    fit, val = subset_design(groups, 10, 4, seed=1)
    assert len(fit) == 10 and len(val) == 4 and not {tuple(v) for v in val} & {tuple(f) for f in fit}
    rng = random.Random(0)
    y = [1.2 + sum(c for u, c in cost.items() if u not in s) + rng.gauss(0, 0.01) for s in fit]
    const, costs = fit_additive(groups, fit, y)
    assert abs(const - 1.2) < 0.1
    for u, c in cost.items():
        assert abs(costs[u] - c) < 0.05, (u, costs[u], c)


def test_fewest_removals_and_cost_weighted_allocation():
    from sglp_edge.budget.latency_model import LatencyModel
    from sglp_edge.budget.search import fewest_removals
    from sglp_edge.sglp.allocation import allocate_removals

    lm = LatencyModel(constant_ms=1.0, unit_costs_ms={"a": 0.5, "b": 0.5, "c": 2.0, "d": 1.0}, groups=[], key={})
    assert lm.predict([]) == 5.0 and lm.predict(["c"]) == 3.0
    assert fewest_removals(lm, 5.0) == 0 and fewest_removals(lm, 3.0) == 1 and fewest_removals(lm, 1.9) == 3
    # proportional to what a segment's removable units cost, not to how many there are
    assert allocate_removals([4, 4], [5, 5], 4) == [2, 2]
    assert allocate_removals([4, 4], [5, 5], 4, weights=[3.0, 1.0]) == [3, 1]
    with pytest.raises(UserError, match="cannot remove"):
        allocate_removals([4, 4], [5, 5], 9, weights=[3.0, 1.0])


class _PredictedOnly:
    """The search policy of BudgetSearch without its measuring step: accept when predicted meets."""

    def __init__(self, lm, target_ms, start):
        self.lm, self.target_ms, self.start, self.seen = lm, target_ms, start, []

    def accept(self, removed):
        self.seen.append((list(removed), self.lm.predict(removed)))
        return self.seen[-1][1] <= self.target_ms

    def exhausted(self, n):
        raise UserError(f"cannot be met: {n} removals cannot be placed")

    def record(self):
        return {"seen": self.seen}


def test_search_takes_the_fewest_removals_that_meet_the_predicted_budget():
    from sglp_edge import api
    from sglp_edge.budget.latency_model import LatencyModel
    from sglp_edge.budget.search import fewest_removals
    from sglp_edge.models.registry import load_model

    torch.manual_seed(0)
    loaded = load_model("cifar_resnet20")
    units = loaded.adapter.units(loaded.model)
    removable = [u.name for u in units if u.removable]
    costs = {u: (0.4 if u.startswith("layer1") else 0.2) for u in removable}
    lm = LatencyModel(constant_ms=1.0, unit_costs_ms=costs, groups=[], key={})
    target = lm.predict([]) - 1.0  # needs ~3 units' worth removed
    search = _PredictedOnly(lm, target, max(1, fewest_removals(lm, target)))
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    plan = api.analyze(loaded.model, [batch], adapter=loaded.adapter, unit_costs=costs, removal_search=search,
                       eval_budget=20)
    n_chosen = len(plan.removed)
    assert lm.predict(plan.removed) <= target
    assert search.seen[-1][0] == plan.removed
    # every step before the chosen one was predicted above the target: no fewer removals would do
    assert all(p > target for _, p in search.seen[:-1]) and len(search.seen) == n_chosen - search.start + 1
    assert plan.search == {"seen": search.seen}


def test_latency_model_on_onnx_runtime(tmp_path, cache, tiny):
    """Real ONNX Runtime timing, through the local Target: a fit, a validation on unseen subsets, a cache."""
    from sglp_edge.budget.latency_model import measure_latency_model
    from sglp_edge.models.registry import load_model
    from sglp_edge.profiles.load import load_profile
    from sglp_edge.targets.factory import make_target

    loaded = load_model(str(tiny))
    prof = load_profile("local-cpu-ort")
    target = make_target(prof)
    kw = dict(simplify="none", rounds=1, n_val=2, overrides=QUICK)
    lm = measure_latency_model(loaded.model, loaded.adapter, torch.randn(1, 3, 32, 32), prof, target, tmp_path / "w",
                               **kw)
    removable = [u.name for u in loaded.adapter.units(loaded.model) if u.removable]
    assert set(lm.unit_costs_ms) == set(removable) and all(c >= 0 for c in lm.unit_costs_ms.values())
    assert len(lm.groups) == 3  # ResNet-20: the removable blocks of each stage share one cost
    # the fit's values are timings (a loaded CPU once fitted constant_ms = 0): check what holds for any timing
    assert lm.constant_ms >= 0 and lm.predict(removable) == pytest.approx(lm.constant_ms)
    assert lm.predict([]) == pytest.approx(lm.constant_ms + sum(lm.unit_costs_ms.values()))
    assert lm.predict([]) > 0
    val = [p for p in lm.points if p["role"] == "validation"]
    assert len(val) == 2 and all(p["measured_p90_ms"] > 0 for p in val)
    for p in val:
        assert p["rel_error"] == pytest.approx(abs(p["predicted_p90_ms"] - p["measured_p90_ms"]) / p["measured_p90_ms"])
    assert lm.key["backend"] == "onnxruntime" and lm.key["runtime"].startswith("onnxruntime==")
    again = measure_latency_model(loaded.model, loaded.adapter, torch.randn(1, 3, 32, 32), prof, target,
                                  tmp_path / "w2", **kw)
    assert again.cached and again.unit_costs_ms == lm.unit_costs_ms and not (tmp_path / "w2").exists()


@needs_fmnist
def test_run_with_keep_auto_meets_a_loose_budget(tmp_path, cache, tiny):
    from sglp_edge.pipeline.config import load_config
    from sglp_edge.pipeline.run import Pipeline

    cfg = dict(CFG, model=str(tiny), prune={**CFG["prune"], "latency_budget_ms": 1000.0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    rep = Pipeline(load_config(tmp_path / "run.yaml"), tmp_path / "run", log=lambda m: None).run()
    plan = json.loads((tmp_path / "run" / "prune" / "plan.json").read_text())
    s = plan["search"]
    assert plan["config"]["keep"] == "auto" and s["budget_ms"] == 1000.0 and s["rounds"] == 1
    c = s["chosen"]
    assert c["measured_p90_ms"] <= 1000.0 and c["n_removed"] == 1 and plan["n_units_after"] == c["kept"]
    assert (tmp_path / "run" / "prune" / "latency_model.json").is_file()
    ls = rep["latency_search"]
    assert ls["chosen"]["kept"] == c["kept"] and ls["final_bench"]["latency_p90_ms"] > 0
    assert ls["final_bench"]["meets_budget"] is True
    assert c["raw_p90_ms"] > 0 and c["measured_p90_ms"] == pytest.approx(c["ratio"] * s["anchor_full_p90_ms"])
    assert ls["final_bench"]["raw_latency_p90_ms"] > 0 and ls["final_bench"]["ratio_to_original"] > 0
    v = ls["final_bench"]["verification"]  # the final check: original and pruned in alternating passes
    assert v["rounds"] == 5 and len(v["ratios"]) == 5 and ls["final_bench"]["ratio_to_original"] == v["ratio"]
    assert "id='latency-search'" in (tmp_path / "run" / "report.html").read_text()


@needs_fmnist
def test_impossible_budget_ends_with_cannot_be_met(tmp_path, cache, tiny):
    """The budget is below what the smallest buildable network reaches: one line, exit status non-zero,
    before any fine-tune, and no run folder left half-written."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dict(CFG, model=str(tiny))))
    env = {**os.environ, "SGLP_EDGE_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "run", "--config", str(tmp_path / "run.yaml"),
                        "--out", str(tmp_path / "run"), "--latency-budget", "0.001"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert "cannot be met: the smallest network reaches" in last and "0.001 ms" in last, p.stderr[-2000:]
    assert not (tmp_path / "run" / "finetune").exists() and not (tmp_path / "run" / "prune").exists()


def test_lm_keep_auto_is_a_decode_budget_on_an_lm_device(tmp_path):
    """An LM's keep: auto is a decode budget (tests/test_decode_budget.py), searched on an LM profile."""
    from sglp_edge.pipeline.config import load_config

    (tmp_path / "lm.yaml").write_text(yaml.safe_dump({"model": "smollm2", "data": "text", "prune": {"keep": "auto"}}))
    with pytest.raises(UserError, match="local-cpu-ort, whose profile is for image-classification; give a causal-lm"):
        load_config(tmp_path / "lm.yaml")


def test_search_report_anchors_the_final_bench_to_the_original(tmp_path):
    """The run's bench times original and pruned: anchored = pruned / original x the latency model's
    unpruned p90; the verdict and error use it, the raw figures stay beside it."""
    from sglp_edge.budget.run import search_html, search_report

    search = {"device": "dev", "budget_ms": 1.2, "anchor_full_p90_ms": 2.0,
              "chosen": {"kept": 16, "predicted_p90_ms": 1.0}, "candidates": []}
    (tmp_path / "plan.json").write_text(json.dumps({"search": search}))
    report = {"targets": [{"device": "dev", "constraints": [
        {"metric": "latency_p90_ms", "measured": 2.2}, {"metric": "accuracy_drop_pct", "measured": 0.5, "passed": True}],
        "results": {"original": {"latency_ms": {"p90": 4.0}}, "pruned": {"latency_ms": {"p90": 2.2}}}}]}
    fb = search_report(tmp_path / "plan.json", report)["final_bench"]
    assert fb["ratio_to_original"] == pytest.approx(0.55) and fb["latency_p90_ms"] == pytest.approx(1.1)
    assert fb["meets_budget"] is True and fb["prediction_error"] == pytest.approx(0.1 / 1.1)
    assert fb["raw_latency_p90_ms"] == 2.2 and fb["raw_meets_budget"] is False
    assert fb["raw_prediction_error"] == pytest.approx(1.2 / 2.2) and fb["original_p90_ms"] == 4.0
    assert "anchored" in search_html({**search, "final_bench": fb})["html"]
    # with the final check's alternating passes, their median ratio decides; the bench pair stays beside it
    ver = {"rounds": 5, "ratio": 0.5, "ratios": [0.5] * 5, "pruned_p90_ms": [1.0] * 5, "original_p90_ms": [2.0] * 5,
           "measured_p90_ms": 1.0}
    fb = search_report(tmp_path / "plan.json", report, ver)["final_bench"]
    assert fb["latency_p90_ms"] == pytest.approx(1.0) and fb["ratio_to_original"] == 0.5
    assert fb["bench_pair_ratio"] == pytest.approx(0.55) and fb["verification"] == ver
    assert "median of 5 alternating passes" in search_html({**search, "final_bench": fb})["html"]


def _artifact(tiny, tmp_path, removed=()):
    from sglp_edge.budget.latency_model import build_artifact
    from sglp_edge.models.registry import load_model
    from sglp_edge.profiles.load import load_profile

    loaded = load_model(str(tiny))
    net = loaded.adapter.remove(loaded.model, list(removed)) if removed else loaded.model
    return loaded, build_artifact(net, torch.randn(1, 3, 32, 32), load_profile("local-cpu-ort"), tmp_path,
                                  opset=None, simplify="none")


def test_time_artifacts_with_a_reference_gives_per_round_ratios(tmp_path, tiny):
    """Real ONNX Runtime through the local Target: per-round ratios against the reference, their
    median as the ratio, raw figures kept beside it. (No bound on the self-ratio itself: that is a
    timing, and a shared CPU moved it to 3.7x once; speed lives in benchmarks/.)"""
    from sglp_edge.budget.latency_model import time_artifacts
    from sglp_edge.profiles.load import load_profile
    from sglp_edge.targets.factory import make_target

    _, art = _artifact(tiny, tmp_path / "a")
    prof = load_profile("local-cpu-ort")
    t = time_artifacts(make_target(prof), prof, {"self": art}, tmp_path / "bench", rounds=2, overrides=QUICK,
                       reference=art)["self"]
    assert len(t["rounds_p90_ms"]) == len(t["reference_rounds_p90_ms"]) == len(t["rounds_ratio"]) == 2
    assert all(r == pytest.approx(a / b) for r, a, b in zip(t["rounds_ratio"], t["rounds_p90_ms"],
                                                             t["reference_rounds_p90_ms"]))
    assert t["ratio"] == pytest.approx(float(np.median(t["rounds_ratio"])))
    assert t["p90_ms"] > 0 and t["reference_p90_ms"] > 0 and t["ratio"] > 0
    with pytest.raises(UserError, match="may not be named"):
        time_artifacts(make_target(prof), prof, {"__reference__": art}, tmp_path / "b", rounds=1, overrides=QUICK,
                       reference=art)


def test_search_decides_on_the_anchored_p90(tmp_path, tiny):
    """The candidate's p90 is its ratio to the unpruned network timed alongside, times the latency
    model's unpruned p90: with that anchor at 10^12 ms, the candidate misses a 10^9 ms budget (raw,
    it would meet it); with the anchor at 10^-9 ms it meets a 10^-6 ms budget (raw, it would miss).
    What is asserted is what the code computes from its timings (the anchored p90, the median of the
    per-pass ratios, the decision), never a timing: the margins hold for any ratio between 10^-3 and
    10^3 and any raw p90 between 1 ns and 10^9 ms, whatever the machine's load."""
    from sglp_edge.budget.latency_model import LatencyModel
    from sglp_edge.budget.search import BudgetSearch
    from sglp_edge.profiles.load import load_profile
    from sglp_edge.targets.factory import make_target

    loaded, _ = _artifact(tiny, tmp_path / "unused")
    prof = load_profile("local-cpu-ort")
    removable = [u.name for u in loaded.adapter.units(loaded.model) if u.removable]
    removed = removable[:1]
    kw = dict(margin=0.0, max_rounds=2, simplify="none", overrides=QUICK)
    for anchor, budget, met in ((1e12, 1e9, False), (1e-9, 1e-6, True)):
        lm = LatencyModel(constant_ms=0.0, unit_costs_ms={u: 0.0 for u in removable}, groups=[], key={},
                          points=[{"removed": [], "measured_p90_ms": anchor}])
        s = BudgetSearch(loaded.model, loaded.adapter, torch.randn(1, 3, 32, 32), prof, make_target(prof), lm, budget,
                         work=tmp_path / f"s{anchor}", **kw)
        assert s.full_ms == anchor
        assert s.accept(removed) is met
        c = s.candidates[-1]
        assert c["measured_p90_ms"] == c["anchored_p90_ms"] == pytest.approx(c["ratio"] * anchor)
        m = c["measured"]
        assert c["ratio"] == pytest.approx(float(np.median(m["rounds_ratio"])))
        assert all(r == pytest.approx(a / b) for r, a, b in zip(m["rounds_ratio"], m["rounds_p90_ms"],
                                                                m["reference_rounds_p90_ms"]))
        assert (c["raw_p90_ms"] <= budget) is not met  # the raw figure alone would have decided the other way
        assert c["prediction_error"] == pytest.approx(abs(c["predicted_p90_ms"] - c["measured_p90_ms"])
                                                      / c["measured_p90_ms"])
        assert (s.chosen is c) is met and s.record()["anchor_full_p90_ms"] == anchor


def test_several_devices_search_on_the_first_and_say_so():
    from sglp_edge.budget.run import prune_settings
    from sglp_edge.pipeline.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "default.yaml", {"prune.keep": "auto"})
    lines = []
    more, extra = prune_settings(cfg, {}, lines.append)
    assert more["device"] == "local-cpu-ort" and extra["budget_device"]["name"] == "local-cpu-ort"
    assert len(lines) == 1 and "local-cpu-openvino" in lines[0] and "not yet" in lines[0]
