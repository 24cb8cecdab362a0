"""``keep: auto`` for a causal LM: a decode budget (tokens/s, TTFT) on the device. The decode-time
line ``a + b x layers`` (fit, clamps), the joint choice of the layers and the precision predicted
within the budget (least predicted perplexity), the one-line errors of the config and the CLI, and
``sglp-edge run`` on a tiny random Llama timed by the real onnxruntime-genai through the local
Target at fp32, int8 and int4: a trivially easy budget keeps every layer at the profile's fp32,
``--decode-precisions`` restricts the search and a chosen precision is the one compiled and
benchmarked, an impossible budget ends with exit 2 and one line naming the fastest candidate before
anything is pruned. No timing is asserted: budgets are built from the fitted models' predictions."""

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
from sglp_edge.budget.decode_report import decode_search_html, decode_search_report
from sglp_edge.budget.decode_search import (DecodeBudget, DecodeSearch, check_decode_job, decode_budget,
                                            decode_precisions)
from sglp_edge.pipeline.config import load_config
from sglp_edge.profiles.load import load_profile

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int = 30, a: float = 4.0, b: float = 0.9, ta: float = 20.0, tb: float = 3.0,
              precision: str = "fp32", ppl_full: float | None = None) -> DecodeModel:
    pts = [{"layers": L, "ms_per_token": a + b * L, "ttft_ms": ta + tb * L, "rounds_ms_per_token": [a + b * L] * 2}
           for L in timing_depths(n)]
    dm = fit_points(n, precision, pts, key={})
    dm.ppl_full = ppl_full
    return dm


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


def ladder(fp32_ppl: float = 10.0, int8_ppl: float = 10.2, int4_ppl: float = 12.0) -> list[DecodeModel]:
    """fp32 4 + 0.9 L ms/token, int8 3 + 0.5 L, int4 2.5 + 0.3 L; their full-depth device perplexities."""
    return [synthetic(a=4.0, b=0.9, ppl_full=fp32_ppl), synthetic(a=3.0, b=0.5, precision="int8", ppl_full=int8_ppl),
            synthetic(a=2.5, b=0.3, precision="int4", ppl_full=int4_ppl)]


def ppl_layers(layers: int) -> float:  # monotone: every layer dropped costs 5 % of perplexity
    return 10.0 * (1.0 + 0.05 * (30 - layers))


def test_joint_choice_takes_a_lower_precision_when_the_budget_needs_it():
    prof = load_profile("local-cpu-genai-lm")
    models = ladder()
    s = DecodeSearch(models, DecodeBudget(40.0, None, "given"), prof, margin=0.0, ppl_layers=ppl_layers)
    # fp32 keeps 23 layers (4 + 0.9 x 23 <= 25 ms), int8 and int4 all 30: 10 x 1.35 > 10 x 1.02 < 10 x 1.2
    best = {m.precision: max(L for L in range(1, 31) if m.tokens_per_s(L) >= 40.0) for m in models}
    assert best == {"fp32": 23, "int8": 30, "int4": 30}
    assert (s.chosen["layers"], s.chosen["precision"]) == (30, "int8") and s.dm is models[1] and s.start == 0
    assert s.chosen["predicted_perplexity"] == pytest.approx(10.0 * 10.2 / 10.0) and s.chosen["q"] == pytest.approx(1.02)
    assert len(s.candidates) == 90 and all(c["meets"] == (c["layers"] <= best[c["precision"]]) for c in s.candidates)
    per = {c["precision"]: c for c in s.candidates if c["layers"] == best[c["precision"]]}
    assert per["fp32"]["predicted_perplexity"] == pytest.approx(ppl_layers(23))
    assert per["int4"]["predicted_perplexity"] == pytest.approx(10.0 * 1.2)
    assert "not chosen: predicted perplexity" in per["fp32"]["verdict"] and s.chosen["verdict"].startswith("chosen")
    rec = s.record()
    assert rec["precision"] == "int8" and rec["profile_precision"] == "fp32" and rec["precisions"] == ["fp32", "int8", "int4"]
    assert rec["quality_factors"] == pytest.approx({"fp32": 1.0, "int8": 1.02, "int4": 1.2})
    assert rec["predicted_full_tokens_per_s"] == pytest.approx(1000 / 18.0) and set(rec["decode_models"]) == set(best)
    html = decode_search_html(rec)["html"]
    assert "Precision chosen by the decode budget: int8 (profile precision fp32" in html and "q(p)" in html
    # without the estimate: the most layers, then the higher precision
    plain = DecodeSearch(models, DecodeBudget(40.0, None, "given"), prof, margin=0.0)
    assert (plain.chosen["layers"], plain.chosen["precision"]) == (30, "int8") and plain.chosen["predicted_perplexity"] is None


def test_joint_choice_keeps_the_higher_precision_when_both_fit_with_the_same_layers():
    prof = load_profile("local-cpu-genai-lm")
    easy = DecodeBudget(0.001, None, "given")
    s = DecodeSearch(ladder(), easy, prof, ppl_layers=ppl_layers)
    assert (s.chosen["layers"], s.chosen["precision"]) == (30, "fp32")
    # int8 measured a hair BETTER than fp32 (noise): q stays monotone, the tie goes to the higher precision
    tie = DecodeSearch(ladder(int8_ppl=9.9), easy, prof, ppl_layers=ppl_layers)
    assert (tie.chosen["layers"], tie.chosen["precision"]) == (30, "fp32") and tie.q["int8"] == 1.0
    # the models in any order; a profile at int8 searches int8 and int4 (q over PyTorch's full-depth figure)
    low = DecodeSearch(ladder()[:0:-1], DecodeBudget(40.0, None, "given"), prof, margin=0.0, ppl_layers=ppl_layers)
    assert [m.precision for m in low.models] == ["int8", "int4"] and low.q["int8"] == pytest.approx(1.02)
    assert (low.chosen["layers"], low.chosen["precision"]) == (30, "int8")


def test_refusal_names_the_fastest_candidate_over_every_precision():
    prof = load_profile("local-cpu-genai-lm")
    with pytest.raises(UserError) as e:
        DecodeSearch(ladder(), DecodeBudget(1e9, None, "given"), prof, ppl_layers=ppl_layers)
    msg = str(e.value)
    assert msg.startswith("decode budget 1e+09 tok/s cannot be met on local-cpu-genai-lm: the fastest candidate "
                          "(1 layer, int4) is predicted at 357.1 tok/s") and "\n" not in msg
    assert "searched fp32, int8, int4" in msg and "--decode-precisions" not in msg
    with pytest.raises(UserError) as e:  # fp32 only: the lower precisions not searched are named
        DecodeSearch(ladder()[0], DecodeBudget(1e9, None, "given"), prof)
    assert "(1 layer, fp32)" in str(e.value) and "or allow int8/int4 (--decode-precisions)" in str(e.value)
    with pytest.raises(UserError, match=r"TTFT budget 1 ms cannot be met .*\(1 layer, fp32\) is predicted at 23 ms"):
        DecodeSearch(ladder(), DecodeBudget(None, 1.0, "given"), prof)  # (every precision prefills alike here)


def test_decode_precisions_default_to_the_profile_and_lower_and_can_be_restricted(tmp_path):
    genai, ort = load_profile("local-cpu-genai-lm"), load_profile("local-cpu-ort-lm")
    assert decode_precisions(genai) == ["fp32", "int8", "int4"] and decode_precisions(ort) == ["fp32", "int8"]
    assert decode_precisions(load_profile("raspberry-pi-5-lm")) == ["int8"]  # an int8 profile: int8 (and int4 if built)
    assert decode_precisions(genai, ["int4", "fp32"]) == ["fp32", "int4"]
    with pytest.raises(UserError, match=r"local-cpu-ort-lm \(onnxruntime\) builds a causal LM in fp32, int8"):
        decode_precisions(ort, ["int4"])
    with pytest.raises(UserError, match="a decode budget is not yet available for llama.cpp"):
        check_decode_job(load_profile("local-cpu-llamacpp-lm"), None, 5.0, None)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(lm_config(decode_budget_tps=150.0)))
    cfg = load_config(tmp_path / "run.yaml", {"prune.decode_precisions": ["fp32", "int8"]})
    assert cfg.prune.decode_precisions == ["fp32", "int8"] and cfg.prune.keep == "auto"
    from sglp_edge.commands.run import _overrides

    over = _overrides(None, None, None, False, False, 5.0, None, "fp32, int8")
    assert over["prune.decode_precisions"] == ["fp32", "int8"] and over["prune.decode_budget_tps"] == 5.0


def test_search_report_sets_the_run_bench_against_the_prediction():
    """final_bench: the measured tokens/s against the prediction, and anchored = pruned / original x the
    decode model's full-depth prediction (the verification's median ratio when there is one)."""
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
    (lm_config(decode_budget_tps=5.0), {"prune.decode_precisions": ["int4"], "devices": ["local-cpu-ort-lm"]},
     "--decode-precisions (prune.decode_precisions) int4: local-cpu-ort-lm (onnxruntime) builds a causal LM in fp32, int8"),
    (lm_config(keep=3), {"prune.decode_precisions": ["int8"]}, "prune.decode_precisions goes with a decode budget"),
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
def tiny_llama_folder(d: Path) -> Path:
    """4 layers, hidden 64 (the builder's INT4 k-quant takes rows of 64), head size 16 (genai's CPU attention),
    a rare EOS id (genai's fp32 greedy tokens then match PyTorch's, as in tests/test_lm_genai.py)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_edge.models.hf_llm import save_hf
    from tests.test_pipeline_lm import char_tokenizer

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256, bos_token_id=1, eos_token_id=255,
                                     pad_token_id=1)).eval()
    return save_hf(m, d / "tiny-llama", tokenizer=char_tokenizer())


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

    d = tmp_path_factory.mktemp("decode-budget")
    old = os.environ.get("SGLP_EDGE_CACHE")
    os.environ["SGLP_EDGE_CACHE"] = str(d / "cache")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tiny_llama_folder(d)
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
    assert [c["layers"] for c in s["candidates"] if c["precision"] == "fp32"] == [4, 3, 2, 1]
    assert len(s["candidates"]) == 12 and all(c["meets"] for c in s["candidates"])
    # fp32, int8 and int4 fitted; every one keeps 4 layers: the higher precision wins (q is monotone, fp32's 1)
    assert s["precisions"] == ["fp32", "int8", "int4"] and s["precision"] == s["profile_precision"] == "fp32"
    q = s["quality_factors"]
    assert q["fp32"] == 1.0 and 1.0 <= q["int8"] <= q["int4"] and all(m["ppl_full"] > 0 for m in s["decode_models"].values())
    assert s["chosen"]["predicted_perplexity"] > 0 and (d / "run" / "compile-onnxruntime-genai-fp32").is_dir()
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
                "--decode-precisions", "fp32", "--out", str(d / "run2"), env={"SGLP_EDGE_CACHE": str(d / "cache")})
    assert p.returncode == 2, p.stderr[-3000:]
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert "decode budget 1e+09 tok/s cannot be met on local-cpu-genai-lm: the fastest candidate (1 layer, fp32)" \
        in last, p.stderr[-3000:]
    assert "decode model: cached" in p.stderr  # the easy run's measurement, reused
    assert not (d / "run2" / "prune").exists() and not (d / "run2" / "finetune").exists()


def test_refusal_over_every_precision_names_the_fastest(tiny_run):
    """By default fp32, int8 and int4 are searched (all cached by the easy run): the one line names
    the fastest of them all, as the fitted models predict it."""
    d, folder, rep = tiny_run
    models = [DecodeModel.from_dict(m) for m in rep["latency_search"]["decode_models"].values()]
    rank = {"fp32": 0, "int8": 1, "int4": 2}
    tps, _, _, prec, layers = max((m.tokens_per_s(L), -L, -rank[m.precision], m.precision, L)  # ties: fewest layers
                                  for m in models for L in range(1, 5))
    p = cli_run("--config", str(d / "run2.yaml"), "--device", "local-cpu-genai-lm", "--decode-budget", "1e9",
                "--out", str(d / "run4"), env={"SGLP_EDGE_CACHE": str(d / "cache")})
    assert p.returncode == 2, p.stderr[-3000:]
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert (f"the fastest candidate ({layers} layer{'s' if layers != 1 else ''}, {prec}) is predicted at {tps:.4g} "
            "tok/s") in last and "searched fp32, int8, int4" in last, p.stderr[-3000:]
    assert p.stderr.count("decode model: cached") == 3 and not (d / "run4" / "prune").exists()


def test_chosen_precision_is_the_one_compiled_and_benchmarked(tiny_run):
    """``decode_precisions: [int8]`` on the fp32 profile: the run compiles and benchmarks int8 (the
    profile copy handed to those stages), and says so; the int8 fit comes from the cache."""
    import torch

    from sglp_edge.pipeline.run import Pipeline

    d, folder, _ = tiny_run
    (d / "run3.yaml").write_text(yaml.safe_dump(lm_config(str(folder), decode_budget_tps=0.001,
                                                          decode_precisions=["int8"])))
    old, logs = os.environ.get("SGLP_EDGE_CACHE"), []
    os.environ["SGLP_EDGE_CACHE"] = str(d / "cache")
    devices_before = os.environ.get("SGLP_EDGE_DEVICES")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = Pipeline(load_config(d / "run3.yaml"), d / "run3", log=logs.append).run()
    finally:
        torch.set_num_threads(n)
        if old is None:
            os.environ.pop("SGLP_EDGE_CACHE", None)
        else:
            os.environ["SGLP_EDGE_CACHE"] = old
    assert os.environ.get("SGLP_EDGE_DEVICES") == devices_before  # the profile copy is found only during the stages
    s = rep["latency_search"]
    assert s["precision"] == "int8" and s["profile_precision"] == "fp32" and s["precisions"] == ["int8"]
    assert any(m.startswith("decode model: cached") for m in logs)
    comp = d / "run3" / "compile-onnxruntime-genai-int8"
    assert json.loads((comp / "pruned" / "lm.json").read_text())["precision"] == "int8"
    assert json.loads((comp / "original" / "lm.json").read_text())["precision"] == "int8"
    assert not (d / "run3" / "compile-onnxruntime-genai-fp32").exists()
    t = rep["targets"][0]
    assert t["device"] == "local-cpu-genai-lm" and t["precision"] == "int8"
    assert s["final_bench"]["verification"]["rounds"] == 5  # the final check timed the int8 artifacts
    assert "Precision chosen by the decode budget: int8" in (d / "run3" / "report.html").read_text()
