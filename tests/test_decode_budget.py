"""``keep: auto`` for a causal LM: a decode budget (tokens/s, TTFT) on the device. The decode-time
line ``a + b x layers`` (fit, clamps), the choice of the most layers predicted within the budget,
the one-line errors of the config and the CLI, and ``sglp-edge run`` on a tiny random Llama timed
by the real onnxruntime-genai through the local Target: a trivially easy budget keeps every layer,
an impossible one ends with exit 2 and one line before anything is pruned. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.board.errors import UserError
from sglp_edge.budget.decode_model import DecodeModel, fit_line, fit_points, timing_depths
from sglp_edge.budget.decode_search import DecodeBudget, DecodeSearch, decode_budget
from sglp_edge.pipeline.config import load_config
from sglp_edge.profiles.load import load_profile

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int = 30, a: float = 4.0, b: float = 0.9, ta: float = 20.0, tb: float = 3.0) -> DecodeModel:
    pts = [{"layers": L, "ms_per_token": a + b * L, "ttft_ms": ta + tb * L, "rounds_ms_per_token": [a + b * L] * 2}
           for L in timing_depths(n)]
    return fit_points(n, "fp32", pts, key={})


def test_fit_line_recovers_a_line_and_clamps_noise():
    f = fit_line([30, 20, 10], [4.0 + 0.9 * x for x in (30, 20, 10)])
    assert f["a_ms"] == pytest.approx(4.0) and f["b_ms"] == pytest.approx(0.9) and f["r2"] == pytest.approx(1.0)
    assert not f["clamped"]
    down = fit_line([4, 3, 1], [1.0, 1.2, 1.5])  # deeper measured faster: noise, never a negative layer cost
    assert down["b_ms"] == 0.0 and down["a_ms"] == pytest.approx(1.2333, rel=1e-3) and down["clamped"]
    neg = fit_line([4, 3, 1], [4.0, 2.5, 0.1])  # a negative constant: the line through the origin
    assert neg["a_ms"] == 0.0 and neg["b_ms"] > 0 and neg["clamped"]
    assert timing_depths(30) == [30, 20, 10] and timing_depths(4) == [4, 3, 1] and timing_depths(1) == [1]


def test_search_keeps_the_most_layers_predicted_within_the_budget():
    dm = synthetic()  # 4 + 0.9 L ms per token: L=30 -> 32.3 tok/s, L=20 -> 45.5, L=1 -> 204
    prof = load_profile("local-cpu-genai-lm")
    s = DecodeSearch(dm, DecodeBudget(40.0, None, "given"), prof, margin=0.0)
    best = max(L for L in range(1, 31) if 1000 / (4 + 0.9 * L) >= 40.0)
    assert s.chosen["layers"] == best and s.start == 30 - best and s.chosen["verdict"].startswith("chosen")
    assert len(s.candidates) == 30 and all(c["meets"] == (c["layers"] <= best) for c in s.candidates)
    assert DecodeSearch(dm, DecodeBudget(40.0, None, "given"), prof, margin=0.2).chosen["layers"] < best
    assert DecodeSearch(dm, DecodeBudget(0.001, None, "given"), prof).chosen["layers"] == 30
    both = DecodeSearch(dm, DecodeBudget(40.0, 50.0, "given"), prof, margin=0.0)  # TTFT 20 + 3 L <= 50: L <= 10
    assert both.chosen["layers"] == 10
    rec = both.record()
    assert rec["kind"] == "decode" and rec["chosen"]["layers"] == 10 and rec["precisions"] == ["fp32"]
    assert rec["predicted_full_tokens_per_s"] == pytest.approx(1000 / 31.0) and rec["rounds"] == 2
    assert both.accept(["model.layers.3"]) and both.record()["chosen"]["removed"] == ["model.layers.3"]
    with pytest.raises(UserError, match="cannot place"):
        both.exhausted(20)


def test_impossible_budgets_are_one_line():
    dm, prof = synthetic(), load_profile("local-cpu-genai-lm")
    with pytest.raises(UserError) as e:
        DecodeSearch(dm, DecodeBudget(1e9, None, "given"), prof)
    msg = str(e.value)
    assert msg.startswith("decode budget 1e+09 tok/s cannot be met on local-cpu-genai-lm: the fastest candidate "
                          "(1 layer, fp32) is predicted at 204.1 tok/s") and "\n" not in msg
    with pytest.raises(UserError, match=r"TTFT budget 1 ms cannot be met .* predicted at 23 ms"):
        DecodeSearch(dm, DecodeBudget(None, 1.0, "given"), prof)


def test_search_report_sets_the_run_bench_against_the_prediction():
    """final_bench: the measured tokens/s against the prediction, and anchored = pruned / original x the
    decode model's full-depth prediction (the verification's median ratio when there is one)."""
    from sglp_edge.budget.decode_search import decode_search_html, decode_search_report

    s = DecodeSearch(synthetic(), DecodeBudget(40.0, None, "given"), load_profile("local-cpu-genai-lm"), margin=0.0)
    rec = s.record()
    lm = {"original": {"decode_tokens_per_s": 30.0, "perplexity": 20.0},
          "pruned": {"decode_tokens_per_s": 45.0, "ttft_ms": 80.0, "perplexity": 22.0}}
    report = {"targets": [{"device": "local-cpu-genai-lm", "lm": lm, "constraints": []}]}
    fb = decode_search_report(rec, report)["final_bench"]
    assert fb["decode_tokens_per_s"] == 45.0 and fb["meets_decode_budget"] is True and fb["ratio_to_original"] == 1.5
    assert fb["anchored_decode_tokens_per_s"] == pytest.approx(1.5 * 1000 / 31.0) and fb["verification"] is None
    assert fb["prediction_error"] == pytest.approx(abs(s.chosen["predicted_tokens_per_s"] - 45.0) / 45.0)
    ver = {"rounds": 5, "ratio": 1.2, "ratios": [1.2] * 5}
    fb = decode_search_report(rec, report, ver)["final_bench"]
    assert fb["ratio_to_original"] == 1.2 and fb["bench_pair_ratio"] == 1.5
    assert fb["anchored_decode_tokens_per_s"] == pytest.approx(1.2 * 1000 / 31.0)
    html = decode_search_html({**rec, "final_bench": fb})["html"]
    assert "id='decode-search'" in html and "median of 5 alternating passes" in html


def test_budget_comes_from_the_profile_when_not_given():
    prof = load_profile("local-cpu-genai-lm")
    b = decode_budget(prof, None, None)
    assert b.tokens_per_s == 30 and b.ttft_ms == 500 and b.source.startswith("profile local-cpu-genai-lm")
    assert decode_budget(prof, 150.0, None).tokens_per_s == 150.0 and decode_budget(prof, 150.0, None).ttft_ms is None
    with pytest.raises(UserError, match="no decode_tokens_per_s or ttft_ms constraint; give --decode-budget"):
        decode_budget(load_profile("local-cpu-ort"), None, None)


def lm_config(model: str = "smollm2", **prune) -> dict:
    return {"name": "lmb", "model": model, "data": "text", "text": {"block_size": 32, "max_tokens": 12000},
            "prune": {"calib_batches": 2, "batch_size": 2, "seq_len": 32, "latency_rounds": 2, **prune},
            "finetune": {"steps": 2, "batch_size": 2, "val_samples": 2, "test_samples": 3},
            "eval": {"samples": 2, "prompt_tokens": 16, "gen_tokens": 8, "greedy_prompts": 2, "greedy_tokens": 4},
            "devices": ["local-cpu-genai-lm"]}


@pytest.mark.parametrize("cfg,over,needle", [
    (lm_config(), {"prune.keep": "auto", "prune.latency_budget_ms": 5.0},
     "is a p90 budget for image models; a causal LM takes --decode-budget TOK_S"),
    ({"model": "cifar_resnet20", "data": "fashion-mnist", "prune": {}}, {"prune.decode_budget_tps": 5.0},
     "decode budgets for causal LMs; an image model takes --latency-budget"),
    (lm_config(keep=3), {"prune.ttft_budget_ms": 100.0}, "prune.ttft_budget_ms goes with prune.keep: auto"),
    (dict(lm_config(), devices=["local-cpu-ort"]), {"prune.decode_budget_tps": 5.0},
     "local-cpu-ort, whose profile is for image-classification"),
])
def test_config_errors_are_one_line(tmp_path, cfg, over, needle):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "run.yaml", over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_decode_budget_implies_keep_auto(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(lm_config(decode_budget_tps=150.0)))
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.prune.keep == "auto" and cfg.prune.decode_budget_tps == 150.0 and cfg.prune.ttft_budget_ms is None


def cli_run(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglp_edge.cli", "run", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def test_cli_refuses_a_decode_budget_for_an_image_model(tmp_path):
    p = cli_run("--config", str(ROOT / "configs" / "default.yaml"), "--decode-budget", "150",
                "--out", str(tmp_path / "run"))
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--latency-budget" in lines[0], p.stderr[-2000:]


# ---- on a tiny random Llama, timed by onnxruntime-genai on this machine ---------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``sglp-edge run`` with a trivially easy decode budget on a tiny Llama: the decode model is
    measured once (into this module's cache) and the impossible-budget run below reuses it."""
    pytest.importorskip("onnxruntime_genai")
    from sglp_edge.data.text import TEXT_DOC_ROOT

    if not Path(TEXT_DOC_ROOT).is_dir():
        pytest.skip("the English text corpus is not installed")
    import torch

    from sglp_edge.pipeline.run import Pipeline
    from tests.test_pipeline_lm import tiny_lm_folder

    d = tmp_path_factory.mktemp("decode-budget")
    old = os.environ.get("SGLP_EDGE_CACHE")
    os.environ["SGLP_EDGE_CACHE"] = str(d / "cache")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tiny_lm_folder(d)
        (d / "run.yaml").write_text(yaml.safe_dump(lm_config(str(folder), decode_budget_tps=0.001)))
        rep = Pipeline(load_config(d / "run.yaml"), d / "run", log=lambda m: None).run()
    finally:
        torch.set_num_threads(n)
        if old is None:
            os.environ.pop("SGLP_EDGE_CACHE", None)
        else:
            os.environ["SGLP_EDGE_CACHE"] = old
    return d, folder, rep


def test_easy_budget_keeps_every_layer_and_reports_the_search(tiny_run):
    d, _, rep = tiny_run
    plan = json.loads((d / "run" / "prune" / "plan.json").read_text())
    s = plan["search"]
    assert plan["config"]["keep"] == "auto" and s["kind"] == "decode" and s["budget_tokens_per_s"] == 0.001
    assert s["chosen"]["layers"] == 4 == s["n_layers"] and plan["n_units_after"] == 4 and plan["removed"] == []
    dm = json.loads((d / "run" / "prune" / "decode_model.json").read_text())
    assert [p["layers"] for p in dm["points"]] == [4, 3, 1] and all(p["tokens_per_s"] > 0 for p in dm["points"])
    assert dm["decode"]["a_ms"] >= 0 and dm["decode"]["b_ms"] >= 0 and dm["ttft"]["b_ms"] >= 0
    assert all(len(p["rounds_ms_per_token"]) == 2 for p in dm["points"])
    assert [c["layers"] for c in s["candidates"]] == [4, 3, 2, 1] and all(c["meets"] for c in s["candidates"])
    fb = rep["latency_search"]["final_bench"]
    assert fb["decode_tokens_per_s"] > 0 and fb["meets_decode_budget"] is True and fb["predicted_tokens_per_s"] > 0
    assert fb["anchored_decode_tokens_per_s"] > 0 and fb["ttft_ms"] > 0
    v = fb["verification"]  # the final check: original and pruned in alternating passes
    assert v["rounds"] == 5 and len(v["ratios"]) == 5 and fb["ratio_to_original"] == v["ratio"]
    assert "id='decode-search'" in (d / "run" / "report.html").read_text()


def test_chosen_layer_count_lies_within_the_model(tiny_run):
    """A budget between the measured extremes keeps 1..4 layers, whatever this CPU's speed."""
    _, _, rep = tiny_run
    s = rep["latency_search"]
    dm = DecodeModel.from_dict(s["decode_model"])
    mid = 0.999 * (dm.tokens_per_s(1) + dm.tokens_per_s(4)) / 2  # (a flat fit, b = 0, predicts one speed)
    prof = load_profile("local-cpu-genai-lm")
    assert 1 <= DecodeSearch(dm, DecodeBudget(mid, None, "given"), prof, margin=0.0).chosen["layers"] <= 4


def test_impossible_budget_is_refused_with_exit_2_before_pruning(tiny_run):
    d, folder, _ = tiny_run
    (d / "run2.yaml").write_text(yaml.safe_dump(lm_config(str(folder))))
    p = cli_run("--config", str(d / "run2.yaml"), "--device", "local-cpu-genai-lm", "--decode-budget", "1e9",
                "--out", str(d / "run2"), env={"SGLP_EDGE_CACHE": str(d / "cache")})
    assert p.returncode == 2, p.stderr[-3000:]
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert "decode budget 1e+09 tok/s cannot be met on local-cpu-genai-lm: the fastest candidate (1 layer, fp32)" \
        in last, p.stderr[-3000:]
    assert "decode model: cached" in p.stderr  # the easy run's measurement, reused
    assert not (d / "run2" / "prune").exists() and not (d / "run2" / "finetune").exists()
