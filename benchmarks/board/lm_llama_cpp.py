"""llama.cpp behind the LM benchmark (standard library + numpy; Python 3.8+; no torch, no tokenizer).

A GGUF (``sglp-edge export --gguf``, or the ``llama.cpp`` route of ``sglp-edge run``) measured with
llama.cpp's own tools, found by :func:`benchmarks.board.llama_cpp.llama_cpp_root` (``--llama-cpp``,
``$SGLP_EDGE_LLAMA_CPP``, ``~/.cache/sglp-edge/llama.cpp``), into the same metrics as
:mod:`benchmarks.board.lm_bench`'s decode loop on the other backends:

- speed, ``llama-bench`` (after its own warm-up run, ``--gen-rounds`` repetitions): ``pp`` = the P-token
  prompt from an empty context (``-p P -n 0``), ``tg`` = G tokens decoded after a context of P tokens
  (``-p 0 -n G -d P``); TTFT = P / pp tok/s in ms, decode tokens/s = tg. llama-bench times whole tests,
  not single tokens: ``decode_p50_ms`` / ``decode_p90_ms`` are over the repetitions' mean ms per token;
- perplexity, ``llama-perplexity -c <block>`` on the held-out text the host wrote (``ppl_text``, the
  decoded blocks ``ppl_text_blocks``, checked on the host to re-tokenise to the same ids). It scores
  the second half of each block from the first half's context (the other backends score every
  token), so ``torch_perplexity`` is PyTorch's scored the same way on the same blocks
  (``ppl_text_torch_nll``), or None where the eval data lacks it;
- greedy agreement, ``llama-simple`` (it takes text and prints text: no token ids): its greedy
  continuation of each prompt text against PyTorch's greedy tokens decoded on the host (up to the
  first end-of-generation token, where llama-simple stops): character level, the longest common
  prefix over the longer of the two texts (``greedy.method`` says so);
- peak memory: llama-bench's own peak resident memory (``VmHWM``); the model size from the file.

The host writes the text only where it re-tokenises to the same ids; without it (eval data of an
older sglp-edge, or text that does not round-trip) perplexity / greedy agreement are ``None`` (not
measured) and ``note`` says why.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks.board.errors import UserError
from benchmarks.board.llama_cpp import bench, llama_cpp_root, perplexity as llama_perplexity, simple_text, tool

BACKEND = "llama.cpp"
#: the tools a benchmark needs (llama-bench is what llama_cpp_root checks for)
TOOLS = ("llama-perplexity", "llama-simple")
GREEDY_METHOD = ("character-level: llama-simple's greedy text vs PyTorch's greedy tokens decoded on the host; "
                 "agreement = longest common prefix / the longer text, summed over prompts")
PPL_METHOD = "llama-perplexity -c <block>: the second half of each block, from the first half's context"


def require(explicit: Any = None) -> Path:
    """llama.cpp's tree with the tools the benchmark runs, or a one-line UserError naming how to get it."""
    root = llama_cpp_root(explicit, need="bin")
    for name in TOOLS:
        tool(root, name)
    return root


def speed(root: Path, gguf: Path, prompt_tokens: int, gen_tokens: int, *, threads: int,
          rounds: int) -> Dict[str, Any]:
    """TTFT and decode speed from llama-bench, in :func:`benchmarks.board.lm_bench.speed`'s form."""
    p, g, r = int(prompt_tokens), int(gen_tokens), max(1, int(rounds))
    pp = bench(root, gguf, prompt=p, gen=0, threads=threads, repetitions=r, depth=0)
    tg = bench(root, gguf, prompt=0, gen=g, threads=threads, repetitions=r, depth=p)
    pp_rounds = [float(x) for row in pp["raw"] for x in (row.get("samples_ts") or [])] or [pp["pp"]]
    tg_rounds = [float(x) for row in tg["raw"] for x in (row.get("samples_ts") or [])] or [tg["tg"]]
    per_tok = np.array([1e3 / x for x in tg_rounds])
    peaks = [x for x in (pp["peak_rss_mb"], tg["peak_rss_mb"]) if x is not None]
    return {"prompt_tokens": p, "gen_tokens": g, "rounds": r, "ttft_ms": p / pp["pp"] * 1e3,
            "decode_tokens_per_s": tg["tg"], "decode_p50_ms": float(np.percentile(per_tok, 50)),
            "decode_p90_ms": float(np.percentile(per_tok, 90)),
            "llama_bench": {f"pp{p}": pp["pp"], f"tg{g}": tg["tg"]},
            "ttft_ms_rounds": [p / x * 1e3 for x in pp_rounds], "decode_tokens_per_s_rounds": tg_rounds,
            "method": f"llama-bench -p {p} -n 0 and -p 0 -n {g} -d {p}, -r {r} -t {threads}; "
                      "p50/p90 over the repetitions' mean ms per token",
            "llama_bench_json": pp["raw"] + tg["raw"], "peak_rss_mb": max(peaks) if peaks else None}


def _text(data: Dict[str, Any], key: str) -> Optional[str]:
    return str(data[key]) if key in data else None


def perplexity(root: Path, gguf: Path, data: Dict[str, Any], *, threads: int,
               max_eval: Optional[int] = None) -> Dict[str, Any]:
    """llama-perplexity on the eval data's ``ppl_text`` with a context of one block."""
    block = int(np.asarray(data["ppl_blocks"]).shape[1])
    text = _text(data, "ppl_text")
    blocks = [int(i) for i in np.asarray(data.get("ppl_text_blocks", []))]
    base = {"perplexity": None, "method": PPL_METHOD, "ctx": block, "blocks": blocks, "first": block // 2,
            "torch_perplexity": None}
    if text is None:
        return dict(base, note="the eval data has no ppl_text (held-out text for llama.cpp; sglp-edge writes it "
                               "where the text re-tokenises to the same ids)")
    n = min(len(blocks), int(max_eval)) if max_eval else len(blocks)
    if n < 2:
        return dict(base, note=f"llama-perplexity needs at least 2 blocks of {block} tokens; the text holds {n}")
    with tempfile.TemporaryDirectory(prefix="sglp-llama-ppl-") as tmp:
        path = Path(tmp) / "heldout.txt"
        path.write_bytes(text.encode("utf-8"))
        res = llama_perplexity(root, gguf, path, ctx=block, threads=threads, chunks=n)
    nll = np.asarray(data.get("ppl_text_torch_nll", []), np.float64)
    torch_ppl = float(np.exp(nll[:n].mean())) if len(nll) >= n else None  # PyTorch, scored the same way
    return dict(base, perplexity=res["perplexity"], chunks=res["chunks"], blocks=blocks[:n], torch_perplexity=torch_ppl)


def _common_prefix(a: str, b: str) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def greedy(root: Path, gguf: Path, data: Dict[str, Any]) -> Dict[str, Any]:
    """llama-simple's greedy text of each prompt against PyTorch's (character level, see the module doc)."""
    n_new = int(np.asarray(data["greedy_reference"]).shape[1])
    base = {"agreement": None, "method": GREEDY_METHOD, "new_tokens": n_new, "prompts": 0, "divergences": []}
    if "greedy_prompt_text" not in data or "greedy_reference_text" not in data:
        return dict(base, note="the eval data has no greedy_prompt_text / greedy_reference_text (sglp-edge writes "
                               "them where the prompts re-tokenise to the same ids)")
    prompts = [str(x) for x in np.asarray(data["greedy_prompt_text"]).reshape(-1)]
    refs = [str(x) for x in np.asarray(data["greedy_reference_text"]).reshape(-1)]
    index = [int(i) for i in np.asarray(data.get("greedy_text_index", np.arange(len(prompts))))]
    if not prompts:
        return dict(base, note="no greedy prompt re-tokenised to the same ids on the host")
    same = longest = 0
    rows: List[Dict[str, Any]] = []
    for i, prompt, want in zip(index, prompts, refs):
        got = simple_text(root, gguf, prompt, n_new)
        k = _common_prefix(got["text"], want)
        same += k
        longest += max(len(got["text"]), len(want))
        row = {"prompt": i, "identical": got["text"] == want, "common_prefix_chars": k, "chars_pytorch": len(want),
               "chars_llama_cpp": len(got["text"]), "prompt_echoed": got["echo"]}
        rows.append(row)
        if not row["identical"]:
            base["divergences"].append(dict(row, pytorch=want[k:k + 80], llama_cpp=got["text"][k:k + 80]))
    return dict(base, agreement=same / float(longest) if longest else 1.0, prompts=len(rows),
                identical=all(r["identical"] for r in rows), per_prompt=rows)


def measure(artifact: Path, data: Dict[str, Any], *, threads: Optional[int] = None, rounds: int = 3,
            max_eval: Optional[int] = None, llama_cpp: Any = None) -> Dict[str, Any]:
    """The whole llama.cpp benchmark of one GGUF: {"speed", "perplexity", "greedy", "memory", "settings"}
    (lm_bench.run makes the metrics and the result document of them). llama.cpp is looked for first."""
    gguf = Path(artifact).resolve()
    if gguf.suffix.lower() != ".gguf" or not gguf.is_file():
        raise UserError(f"backend {BACKEND} runs a .gguf file (sglp-edge export MODEL --gguf), not {artifact}")
    root = require(llama_cpp)
    t = int(threads or os.cpu_count() or 1)
    sp = speed(root, gguf, len(np.asarray(data["bench_prompt"])), int(data["gen_tokens"]), threads=t, rounds=rounds)
    ppl = perplexity(root, gguf, data, threads=t, max_eval=max_eval)
    agree = greedy(root, gguf, data)
    mem = {"peak_rss_mb": sp["peak_rss_mb"], "what": "llama-bench's own peak resident memory (VmHWM)"}
    settings = {"threads": t, "llama_cpp": str(root), "tools": ["llama-bench", "llama-perplexity", "llama-simple"],
                "decode_loop": "llama.cpp's own (llama-bench; llama-simple for greedy text)"}
    return {"speed": sp, "perplexity": ppl, "greedy": agree, "memory": mem, "settings": settings}
