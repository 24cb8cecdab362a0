"""Decoder-LM export with a KV cache (text-generation-with-past) and the on-board LM benchmark.

One tiny random Llama is exported once (module fixture); the graph's prefill + decode with past
must equal PyTorch's full recompute, on ONNX Runtime and on OpenVINO (f32), and the board-side
benchmark (benchmarks/board/lm_bench.py, through run_bench's entry) must measure it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.board import lm_bench, run_bench  # noqa: E402
from sglp_edge.export.lm import LAYOUT, io_names, read_lm_meta  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


@pytest.fixture(scope="module")
def tiny_llama():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    yield m
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """Exported through the CLI (`sglp-edge export FOLDER --out X.onnx` writes the folder X) from
    the saved model, which holds the same weights as ``tiny_llama``."""
    from typer.testing import CliRunner

    from sglp_edge.cli import app
    from sglp_edge.models.hf_llm import save_hf

    d = tmp_path_factory.mktemp("lm")
    save_hf(tiny_llama, d / "hf")
    r = CliRunner().invoke(app, ["export", str(d / "hf"), "--out", str(d / "export.onnx")])
    assert r.exit_code == 0, r.output
    assert "text-generation-with-past" in r.output and "passed=True" in r.output
    return d / "export", read_lm_meta(d / "export")


def _torch_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    ids = torch.from_numpy(prompt)[None]
    with torch.no_grad():
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0, eos_token_id=None)
    return g[0, len(prompt):].numpy()


def test_layout_and_recorded_parity(exported):
    out, meta = exported
    ins, outs = io_names(TINY["num_hidden_layers"])
    assert meta["layout"] == LAYOUT and meta["inputs"] == ins and meta["outputs"] == outs
    par = meta["parity_vs_pytorch"]
    assert par["passed"] and par["greedy_equal"] and par["max_abs"] < 1e-4 and par["decode_tokens"] >= 2
    assert not meta["external_data"] and (out / "model.onnx").is_file()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_decode_with_past_equals_full_recompute(exported, tiny_llama, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    out, _ = exported
    sess = lm_bench.LMSession(str(out / "model.onnx"), backend, threads=1)
    ids = np.random.default_rng(5).integers(0, TINY["vocab_size"], (1, 11))
    with torch.no_grad():
        ref = tiny_llama(torch.from_numpy(ids)).logits.numpy()
    # prefill 4 tokens (batch 1, a different size than the trace), then 7 single-token steps
    logits, past = sess.step(ids[:, :4], sess.empty_past(1), 0)
    got = [logits]
    for t in range(4, ids.shape[1]):
        logits, past = sess.step(ids[:, t:t + 1], past, t)
        got.append(logits)
    got = np.concatenate(got, 1)
    assert got.shape == ref.shape and past[0].shape == (1, 2, 11, 16)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # batch 3 prefill-only also runs (dynamic batch), equal to PyTorch
    ids3 = np.random.default_rng(6).integers(0, TINY["vocab_size"], (3, 6))
    with torch.no_grad():
        ref3 = tiny_llama(torch.from_numpy(ids3)).logits.numpy()
    np.testing.assert_allclose(sess.step(ids3, sess.empty_past(3), 0)[0], ref3, atol=1e-4, rtol=1e-4)


def test_perplexity_window_matches_pytorch(exported, tiny_llama):
    """``first=k`` scores only the tokens after position k of each block (llama-perplexity's second-half
    window), the same NLL as PyTorch's log-softmax over those positions; a window with nothing left is refused."""
    from benchmarks.board.errors import UserError

    out, _ = exported
    sess = lm_bench.LMSession(str(out / "model.onnx"), "onnxruntime", threads=1)
    blocks = np.random.default_rng(9).integers(0, TINY["vocab_size"], (3, 12))
    with torch.no_grad():
        lp = torch.log_softmax(tiny_llama(torch.from_numpy(blocks)).logits.double(), -1)
    for first in (0, 6):
        ref = -lp[:, first:-1].gather(-1, torch.from_numpy(blocks[:, first + 1:, None])).mean().item()
        got = lm_bench.perplexity(sess, blocks, first=first)
        assert got["tokens"] == 3 * (11 - first) and got["first"] == first
        assert abs(got["nll"] - ref) < 1e-4
    with pytest.raises(UserError, match="no token to score"):
        lm_bench.perplexity(sess, blocks, first=11)


def test_board_lm_bench_through_run_bench(exported, tiny_llama, tmp_path, capsys):
    out, _ = exported
    rng = np.random.default_rng(7)
    prompts = rng.integers(0, TINY["vocab_size"], (3, 6))
    ref = np.stack([_torch_greedy(tiny_llama, p, 6) for p in prompts])
    blocks = rng.integers(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        lp = torch.log_softmax(tiny_llama(torch.from_numpy(blocks)).logits[:, :-1].double(), -1)
        nll = -lp.gather(-1, torch.from_numpy(blocks)[:, 1:, None]).mean().item()
    npz = lm_bench.write_eval_npz(str(tmp_path / "lm_eval.npz"), bench_prompt=prompts[0].repeat(2), gen_tokens=8,
                                  greedy_prompts=prompts, greedy_reference=ref, ppl_blocks=blocks,
                                  torch_perplexity=math.exp(nll))
    res_path = tmp_path / "res.json"
    rc = run_bench.main(["--artifact", str(out / "model.onnx"), "--backend", "onnxruntime", "--threads", "1",
                         "--data", str(npz), "--out", str(res_path), "--gen-rounds", "2"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(res_path.read_text())
    m = res["metrics"]
    assert res["task"] == "causal-lm"
    assert m["greedy_agreement_pct"] == 100.0 and res["greedy"]["tokens"] == 3 * 6
    assert abs(m["perplexity"] / m["torch_perplexity"] - 1) < 1e-4
    assert m["ttft_ms"] > 0 and m["decode_tokens_per_s"] > 0 and m["decode_p90_ms"] >= m["decode_p50_ms"]
    assert set(res["llama_bench"]) == {"pp12", "tg8"} and len(res["speed"]["decode_tokens_per_s_rounds"]) == 2
    assert m["peak_memory_mb"] > 0 and m["model_size_mb"] > 0.5
    assert "tok/s" in capsys.readouterr().err


def test_lm_bench_rejects_image_data_and_layout(exported, tmp_path):
    from benchmarks.board.errors import UserError

    out, _ = exported
    bad = tmp_path / "img.npz"
    np.savez(bad, x=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(UserError, match="not LM eval data"):
        lm_bench.load_eval_npz(str(bad))
    with pytest.raises(UserError, match="not found"):
        lm_bench.LMSession(str(tmp_path / "nope.onnx"), "onnxruntime")


def test_lm_compile_weight_only_and_trtexec(exported, tmp_path):
    """ORT INT4 (MatMulNBits) and OpenVINO INT8 weight-only run the same decode loop; a group size
    that does not divide the hidden size is refused; TensorRT gets a prefill+decode shape profile."""
    import onnx

    from benchmarks.board.errors import UserError
    from exporters.lm_compile import compile_lm

    out, _ = exported
    m = compile_lm(out / "model.onnx", "onnxruntime", "int4", tmp_path / "ort4", group_size=32)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "ort4" / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops and m["quantization"]["quantized_matmuls"] == 3 * 7 + 1
    assert m["size_bytes"] < 0.75 * (out / "model.onnx").stat().st_size  # tiny: the fp32 embedding table is a big share
    assert m["parity"]["max_abs"] > 0 and m["parity"]["next_token_agreement"] >= 0.5
    # accuracy_level 4 (int8 compute, the default) is written into every MatMulNBits node and the
    # manifest; 0 (ORT's unset: fp32 compute) stays reachable
    def levels(d):
        nodes = [n for n in onnx.load(str(d / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
        return {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in nodes}

    assert m["quantization"]["accuracy_level"] == 4 and levels(tmp_path / "ort4") == {4}
    m80 = compile_lm(out / "model.onnx", "onnxruntime", "int8", tmp_path / "ort8a0", accuracy_level=0)
    assert m80["quantization"]["accuracy_level"] == 0 and levels(tmp_path / "ort8a0") == {0}
    assert m80["parity"]["next_token_agreement"] >= 0.5
    with pytest.raises(UserError, match="accuracy_level"):
        compile_lm(out / "model.onnx", "openvino", "int8", tmp_path / "bad", accuracy_level=4)
    pytest.importorskip("nncf")
    m8 = compile_lm(out / "model.onnx", "openvino", "int8", tmp_path / "ov8")
    assert m8["parity"]["next_token_agreement"] >= 0.9
    sess = lm_bench.LMSession(str(tmp_path / "ov8" / "model.xml"), "openvino", threads=1)
    g = lm_bench.generate(sess, np.arange(5), 3)
    assert len(g["tokens"]) == 4
    with pytest.raises(UserError, match="does not divide the hidden size 64"):
        compile_lm(out / "model.onnx", "openvino", "int4", tmp_path / "bad", group_size=48)
    t = compile_lm(out / "model.onnx", "tensorrt", "fp16", tmp_path / "trt", max_prompt=128, max_context=512)
    cmd = (tmp_path / "trt" / "trtexec.sh").read_text()
    assert "--fp16" in cmd and "input_ids:1x1," in t["trtexec"] and "input_ids:1x128," in cmd
    assert "past_key_values.2.value:1x2x511x16" in cmd and "attention_mask:1x639" in cmd


def test_lm_compile_int4_calibrated_on_text(exported, tmp_path):
    """INT4: GPTQ on ONNX Runtime with calibration blocks (k-quant without), AWQ + scale estimation on
    OpenVINO, the LM head at 8 bits; the choice and the calibration are recorded in the manifest; the
    artifacts decode; GPTQ without calibration blocks is refused."""
    import onnx

    from benchmarks.board.errors import UserError
    from exporters.lm_compile import compile_lm

    out, _ = exported
    calib = np.random.default_rng(0).integers(0, 100, (4, 16))
    m = compile_lm(out / "model.onnx", "onnxruntime", "int4", tmp_path / "ort4", group_size=32, calib_ids=calib,
                   int4_algo="gptq")
    q = m["quantization"]
    assert "GPTQ" in q["method"] and q["calibration"] == {"blocks": 4, "tokens_per_block": 16}
    assert q["head"]["bits"] == 8 and q["unquantized_matmuls"] == 0
    nodes = {n.name: n for n in onnx.load(str(tmp_path / "ort4" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"}
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in nodes.values()}
    assert bits == {4, 8} and len(nodes) == 3 * 7 + 1
    assert m["parity"]["next_token_agreement"] >= 0.5
    g = lm_bench.generate(lm_bench.LMSession(str(tmp_path / "ort4" / "model.onnx"), "onnxruntime", threads=1),
                          np.arange(5), 3)
    assert len(g["tokens"]) == 4
    kq = compile_lm(out / "model.onnx", "onnxruntime", "int4", tmp_path / "kq", group_size=32)["quantization"]
    assert "k-quant" in kq["method"] and kq["head"]["bits"] == 8 and kq["unquantized_matmuls"] == 0
    # llama.cpp's mixed layers at 8 bits too: of 3 layers, the last eighth is layer 2 (its v and down projections)
    assert kq["mixed_layers"]["matmuls_at_8_bits"] == 2
    kbits = [next(a.i for a in n.attribute if a.name == "bits")
             for n in onnx.load(str(tmp_path / "kq" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(kbits) == 3 * 7 + 1 and kbits.count(8) == 1 + 2
    with pytest.raises(UserError, match="GPTQ needs calibration"):
        compile_lm(out / "model.onnx", "onnxruntime", "int4", tmp_path / "bad", group_size=32, int4_algo="gptq")
    pytest.importorskip("nncf")
    m4 = compile_lm(out / "model.onnx", "openvino", "int4", tmp_path / "ov4", group_size=32, calib_ids=calib)
    assert "AWQ" in m4["quantization"]["method"] and m4["quantization"]["calibration"]["blocks"] == 4
    assert m4["parity"]["next_token_agreement"] >= 0.5


@pytest.fixture(scope="module")
def exported_ov(tiny_llama, tmp_path_factory):
    """`sglp-edge export FOLDER --out X --openvino`: the ONNX folder plus X/openvino, the stateful IR."""
    pytest.importorskip("openvino")
    from typer.testing import CliRunner

    from sglp_edge.cli import app
    from sglp_edge.models.hf_llm import save_hf

    d = tmp_path_factory.mktemp("lmov")
    save_hf(tiny_llama, d / "hf")
    r = CliRunner().invoke(app, ["export", str(d / "hf"), "--out", str(d / "export"), "--openvino"])
    assert r.exit_code == 0, r.output
    assert "stateful, beam_idx input" in r.output and r.output.count("passed=True") == 2
    return d / "export"


def test_openvino_stateful_export_decodes_like_pytorch(exported_ov, tiny_llama):
    """The stateful IR: KV cache as state behind beam_idx, attention fused with the cache by the CPU
    plugin, and prefill + token-by-token decode equal to PyTorch's full recompute (batch 1 and 3)."""
    import openvino as ov

    xml = exported_ov / "openvino" / "openvino_model.xml"
    meta = json.loads((xml.parent / "lm.json").read_text())
    assert meta["layout"] == "openvino-stateful" and meta["num_layers"] == TINY["num_hidden_layers"]
    assert meta["parity_vs_pytorch"]["passed"] and meta["parity_vs_pytorch"]["max_abs"] < 1e-4
    sess = lm_bench.LMSession(str(xml), "openvino", threads=1)
    assert sess.stateful and sess.input_names == ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    assert "f32" in sess.settings["kv_cache_precision"]
    layers = {op.get_rt_info()["layerType"].astype(str) for op in sess._compiled.get_runtime_model().get_ops()}
    assert "ScaledDotProductAttention" in layers and "MemoryInput" in layers and "Softmax" not in layers
    assert len(ov.Core().read_model(str(xml)).get_sinks()) == 2 * TINY["num_hidden_layers"]
    ids = np.random.default_rng(5).integers(0, TINY["vocab_size"], (1, 11))
    with torch.no_grad():
        ref = tiny_llama(torch.from_numpy(ids)).logits.numpy()
    for _ in range(2):  # the second pass starts a new sequence: step(.., start=0) must reset the state
        logits, past = sess.step(ids[:, :4], sess.empty_past(1), 0)
        got = [logits]
        for t in range(4, ids.shape[1]):
            logits, past = sess.step(ids[:, t:t + 1], past, t)
            got.append(logits)
        np.testing.assert_allclose(np.concatenate(got, 1), ref, atol=1e-4, rtol=1e-4)
    ids3 = np.random.default_rng(6).integers(0, TINY["vocab_size"], (3, 6))
    with torch.no_grad():
        ref3 = tiny_llama(torch.from_numpy(ids3)).logits.numpy()
    np.testing.assert_allclose(sess.step(ids3, sess.empty_past(3), 0)[0], ref3, atol=1e-4, rtol=1e-4)
    prompt = np.arange(5)
    assert lm_bench.generate(sess, prompt, 6)["tokens"] == list(_torch_greedy(tiny_llama, prompt, 7))


def test_lm_compile_from_the_stateful_ir(exported_ov, tmp_path):
    from benchmarks.board.errors import UserError
    from exporters.lm_compile import compile_lm

    xml = exported_ov / "openvino" / "openvino_model.xml"
    m = compile_lm(xml, "openvino", "fp32", tmp_path / "ov32")
    assert m["layout"] == "openvino-stateful" and m["parity"]["reference"].startswith("openvino f32")
    assert m["parity"]["max_abs"] < 1e-5 and m["parity"]["next_token_agreement"] == 1.0
    pytest.importorskip("nncf")
    m8 = compile_lm(xml, "openvino", "int8", tmp_path / "ov8")
    assert 0 < m8["parity"]["max_abs"] and m8["parity"]["next_token_agreement"] >= 0.9
    assert m8["size_bytes"] < 0.75 * m["size_bytes"]
    sess = lm_bench.LMSession(str(tmp_path / "ov8" / "model.xml"), "openvino", threads=1)
    assert sess.stateful and len(lm_bench.generate(sess, np.arange(5), 3)["tokens"]) == 4
    with pytest.raises(UserError, match="compiles for openvino only"):
        compile_lm(xml, "onnxruntime", "fp32", tmp_path / "bad")
    with pytest.raises(UserError, match="no lm.json of a stateful OpenVINO export"):
        compile_lm(tmp_path / "ov8" / "model.xml", "openvino", "fp32", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
