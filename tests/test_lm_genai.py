"""The onnxruntime-genai LM route: sglp_edge.export.lm_genai (builder + parity manifest) and the
harness's onnxruntime-genai backend (benchmarks/board/lm_genai.py through lm_bench / run_bench).

A tiny random Llama (and a tiny Qwen2: q/k/v biases) is saved with a toy tokenizer and exported once;
greedy tokens through onnxruntime-genai must equal transformers' exactly in fp32."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'sglp-edge[llm]')")
pytest.importorskip("onnx_ir", reason="onnxruntime-genai's builder needs onnx-ir")

from benchmarks.board import lm_bench, run_bench  # noqa: E402
from benchmarks.board.lm_genai import GenaiSession, native_generate  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402
from sglp_edge.export.lm_genai import LAYOUT, export_causal_lm_genai  # noqa: E402

VOCAB = 256
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1,
            eos_token_id=VOCAB - 1, pad_token_id=1)  # the builder needs an EOS id; a rare one, so no early stop


def _tokenizer():
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    t = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    # EOS = config's eos id: else the builder adds the tokenizer class's own end-of-turn token (Qwen2: a new id)
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", eos_token=f"w{VOCAB - 3}")


def _save(model, folder):
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _torch_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    ids = torch.from_numpy(np.asarray(prompt, np.int64))[None]
    with torch.no_grad():
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0, eos_token_id=None)
    return g[0, len(prompt):].numpy()


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("genai")
    src = _save(tiny_llama, d / "hf")
    return d / "genai", export_causal_lm_genai(src, d / "genai", precision="fp32")


def test_fp32_export_manifest_and_greedy_identical(exported, tiny_llama):
    out, meta = exported
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "lm.json"} <= {f.name for f in out.iterdir()}
    assert json.loads((out / "lm.json").read_text())["layout"] == LAYOUT == meta["layout"]
    assert meta["num_layers"] == TINY["num_hidden_layers"] and meta["precision"] == "fp32"
    par = meta["parity_vs_pytorch"]
    assert par["passed"] is True and par["greedy_equal"] and par["greedy_agreement"] == 1.0
    assert par["max_abs"] < 1e-4 and par["prompts"] == 2
    for row in par["per_prompt"]:  # no early EOS stop here: the full 16 tokens, and not one repeated token
        assert len(row["genai"]) == 16 and row["genai"] == row["transformers"] and len(set(row["genai"])) > 2
    # independent of the manifest: a fresh prompt through the harness's session vs transformers
    sess = GenaiSession(str(out), threads=1, max_length=64)
    prompt = np.random.default_rng(3).integers(0, VOCAB, 9)
    ref = _torch_greedy(tiny_llama, prompt, 12)
    assert lm_bench.generate(sess, prompt, 11)["tokens"] == ref.tolist()
    assert native_generate(sess, prompt, 11)["tokens"] == ref.tolist()
    # every position's logits of one appended block = transformers' full forward (what perplexity uses)
    logits, past = sess.step(prompt[None], sess.empty_past(1), 0)
    with torch.no_grad():
        full = tiny_llama(torch.from_numpy(prompt[None].astype(np.int64))).logits.numpy()
    assert past == [] and logits.shape == full.shape and np.abs(logits - full).max() < 1e-4


def test_lm_bench_runs_genai_folder(exported, tiny_llama, tmp_path):
    out, _ = exported
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, VOCAB, (2, 6))
    ref = np.stack([np.concatenate([_torch_greedy(tiny_llama, p, 8)]) for p in prompts])
    blocks = rng.integers(0, VOCAB, (2, 16))
    with torch.no_grad():
        lg = tiny_llama(torch.from_numpy(blocks)).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(lg.reshape(-1, VOCAB), torch.from_numpy(blocks[:, 1:]).reshape(-1))
    data = lm_bench.write_eval_npz(str(tmp_path / "lm_eval.npz"), bench_prompt=rng.integers(0, VOCAB, 12),
                                   gen_tokens=6, greedy_prompts=prompts, greedy_reference=ref, ppl_blocks=blocks,
                                   torch_perplexity=float(torch.exp(nll)))
    # through run_bench's entry, the backend named, as a board would run it
    args = run_bench.build_parser().parse_args(["--artifact", str(out), "--backend", "onnxruntime-genai", "--data",
                                                str(data), "--out", str(tmp_path / "r.json"), "--threads", "1",
                                                "--gen-rounds", "1"])
    res = run_bench.run(args)
    m = res["metrics"]
    assert res["backend"] == "onnxruntime-genai" and res["task"] == "causal-lm"
    assert m["decode_tokens_per_s"] > 0 and m["ttft_ms"] > 0 and res["speed"]["gen_tokens"] == 6
    assert m["greedy_agreement_pct"] == 100.0 and res["greedy"]["tokens"] == ref.size
    assert math.isclose(m["perplexity"], m["torch_perplexity"], rel_tol=1e-4)
    assert m["model_size_mb"] > 0 and json.loads((tmp_path / "r.json").read_text())["status"] == "done"
    # the folder picks the backend by itself
    res2 = lm_bench.run(lm_bench.build_parser().parse_args(["--artifact", str(out), "--data", str(data), "--threads",
                                                            "1", "--gen-rounds", "1", "--max-eval", "1"]))
    assert res2["backend"] == "onnxruntime-genai" and res2["perplexity"]["blocks"] == 1


def test_int4_is_awq_scaled_on_calibration_text(tiny_llama, tmp_path):
    """INT4 with calibration blocks: the model is AWQ-scaled on them, then the builder's k-quant INT4 with
    the LM head at INT8; the choice is recorded in lm.json and the folder decodes."""
    import onnx

    src = _save(tiny_llama, tmp_path / "hf")
    calib = np.random.default_rng(0).integers(0, TINY["vocab_size"], (4, 16))
    meta = export_causal_lm_genai(src, tmp_path / "g4", precision="int4", calib_ids=calib)
    q = json.loads((tmp_path / "g4" / "lm.json").read_text())["quantization"]
    assert q == meta["quantization"] and "AWQ" in q["method"] and "k_quant" in q["method"]
    assert q["awq"]["calibration"] == {"blocks": 4, "tokens_per_block": 16} and len(q["awq"]["alphas"]) == TINY["num_hidden_layers"]
    nodes = [n for n in onnx.load(str(tmp_path / "g4" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nodes} == {4, 8}
    sess = GenaiSession(str(tmp_path / "g4"), threads=1)
    assert len(lm_bench.generate(sess, np.arange(1, 6), 3)["tokens"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".awq.")]  # the scaled copy is gone


def test_tiny_qwen2_fp32_identical(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = {k: v for k, v in TINY.items()}
    cfg["num_hidden_layers"] = 2
    m = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero; make them count
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    meta = export_causal_lm_genai(_save(m, tmp_path / "hf"), tmp_path / "genai")
    par = meta["parity_vs_pytorch"]
    assert meta["model_type"] == "qwen2" and par["passed"] is True and par["max_abs"] < 1e-4
    assert all(len(r["genai"]) == 16 for r in par["per_prompt"])


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if name in p.name or "genai-cache" in p.name)


def test_bad_inputs_are_user_errors_and_leave_nothing(tmp_path, tiny_llama, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        export_causal_lm_genai(tmp_path / "empty", tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []
    # an architecture the builder does not convert
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                               "model_type": "gpt2"}))
    with pytest.raises(UserError, match="does not convert GPT2LMHeadModel"):
        export_causal_lm_genai(tmp_path / "gpt2", tmp_path / "out")
    # a Llama config with a tokenizer but no weights: the builder fails half-way -> nothing at --out
    src = _save(tiny_llama, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    with pytest.raises(UserError, match="builder failed"):
        export_causal_lm_genai(src, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == [] and _leftovers(tmp_path, "genai") == []
    with pytest.raises(UserError, match="precision"):
        export_causal_lm_genai(src, tmp_path / "out", precision="fp16")
    # onnxruntime-genai missing: one line naming the install
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="pip install 'onnxruntime-genai"):
        export_causal_lm_genai(src, tmp_path / "out")
    with pytest.raises(UserError, match="pip install 'onnxruntime-genai"):
        GenaiSession(str(tmp_path))


def test_harness_rejects_what_it_cannot_run(exported, tmp_path):
    out, _ = exported
    with pytest.raises(UserError, match="not an onnxruntime-genai folder"):
        GenaiSession(str(tmp_path))
    sess = GenaiSession(str(out), max_length=8)
    with pytest.raises(UserError, match="batch 1"):
        sess.empty_past(2)
    with pytest.raises(UserError, match="exceed max_length"):
        sess.step(np.zeros((1, 9), np.int64), [], 0)
    args = argparse.Namespace(task="image-classification", backend="onnxruntime-genai", artifact=str(out))
    with pytest.raises(UserError, match="decoder LMs only"):
        run_bench.run(args)


def test_export_cli_genai_flag(tiny_llama, tmp_path):
    """`sglp-edge export FOLDER --out X --genai` writes X/genai next to X/model.onnx, from the folder itself."""
    from typer.testing import CliRunner

    from sglp_edge.cli import app

    src = _save(tiny_llama, tmp_path / "hf")
    r = CliRunner().invoke(app, ["export", str(src), "--out", str(tmp_path / "x"), "--genai"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "x" / "genai" / "lm.json").read_text())
    assert meta["source"] == str(src) and meta["parity_vs_pytorch"]["passed"] is True
    assert "onnxruntime-genai fp32" in r.output and "passed=True" in r.output
    assert (tmp_path / "x" / "model.onnx").is_file()
    r = CliRunner().invoke(app, ["export", str(src), "--out", str(tmp_path / "y"), "--genai", "--no-past"])
    assert r.exit_code != 0 and "--genai applies to decoder LMs" in r.output


def test_head_size_not_a_multiple_of_16_is_refused_before_building(tmp_path):
    """ONNX Runtime's CPU GroupQueryAttention fails at run time on head size 8: said in one line up front."""
    from sglp_edge.export.lm_genai import check_source

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                                                      "num_attention_heads": 4}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="head size that is a multiple of 16; .* has 8"):
        check_source(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                                                      "num_attention_heads": 2}))
    assert check_source(tmp_path)["num_attention_heads"] == 2


def test_bench_cli_on_a_genai_folder_says_not_yet(exported, tmp_path):
    from typer.testing import CliRunner

    from sglp_edge.cli import app

    out, _ = exported
    r = CliRunner().invoke(app, ["bench", str(out), "--device", "local-cpu-genai-lm", "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "does not yet take an onnxruntime-genai folder" in r.output
    assert "benchmarks.board.lm_bench" in r.output and not (tmp_path / "b").exists()
