"""Running the board harness (``python -m benchmarks.board.run_bench``) in a child process and
collecting what it leaves: the per-board record (:class:`BoardRun`), the output pump that writes
``stdout.log``/``stderr.log`` as the output arrives, the progress lines, and the one-line error for
a failed benchmark. :func:`run_local` runs the harness on this machine; :mod:`sglp_edge.targets.remote`
runs it on a board over SSH with the same plumbing and the same result layout::

    <out>/{result.json | result.partial.json, stdout.log, stderr.log, remote.json}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.board.atomic import atomic_write_json

from sglp_edge.profiles.load import python_argv

#: the folder that holds the board harness (``benchmarks/board/``)
REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRESS_PREFIX = "@@sglp-progress "
RESULT_NAME = "result.json"
PARTIAL_NAME = "result.partial.json"
EXIT_MARKER = "SGLP_EDGE_EXIT="
ProgressFn = Callable[[str, dict[str, Any]], None]


@dataclass
class BoardRun:
    label: str
    where: str  # "local" or user@host:port
    ok: bool = False
    error: Optional[str] = None
    exit_code: Optional[int] = None
    out_dir: Optional[Path] = None
    result: Optional[dict[str, Any]] = None  # complete result.json
    partial: Optional[dict[str, Any]] = None  # result.partial.json when the run did not finish
    remote_dir: Optional[str] = None
    duration_s: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: the failure came from the environment (a board that stopped answering, a timeout, a full
    #: disk), not from the model or the input: the CLI answers exit status 4 for it
    environment: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("result", None)
        d.pop("partial", None)
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        d["has_result"] = self.result is not None
        d["has_partial"] = self.partial is not None
        return d


def stream_process(argv: list[str], *, stdin: Any, stdout_log: Optional[Path], stderr_log: Optional[Path],
            timeout_s: float, on_line: Optional[Callable[[str], None]] = None,
            cwd: Optional[str] = None, env: Optional[dict[str, str]] = None) -> tuple[Optional[int], str, bool]:
    """Run ``argv`` (a list; no shell), append its stdout/stderr to the log files as they arrive,
    call ``on_line`` for each stdout line. Returns (exit code or None if killed, stderr tail, timed_out)."""
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
    tail: list[str] = []

    def pump(pipe: Any, log: Optional[Path], is_err: bool) -> None:
        fh = open(log, "ab") if log else None
        try:
            for raw in iter(pipe.readline, b""):
                if fh:
                    fh.write(raw)
                    fh.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if is_err:
                    tail.append(line)
                    del tail[:-50]
                elif on_line:
                    try:
                        on_line(line)
                    except Exception:
                        pass
        finally:
            if fh:
                fh.close()
            pipe.close()

    threads = [threading.Thread(target=pump, args=(proc.stdout, stdout_log, False), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, stderr_log, True), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=max(0.1, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()  # our own child (ssh or the local benchmark), by its handle
        proc.wait()
    for t in threads:
        t.join(timeout=5)
    return (None if timed_out else proc.returncode), "\n".join(tail), timed_out


def progress_parser(label: str, on_progress: Optional[ProgressFn]) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        if on_progress and line.startswith(PROGRESS_PREFIX):
            try:
                on_progress(label, json.loads(line[len(PROGRESS_PREFIX):]))
            except ValueError:
                pass

    return on_line


def load_json(p: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def bench_error(code: Optional[int], stderr: str, where: str, python: str) -> str:
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip() and not l.startswith(EXIT_MARKER)]
    errs = [l for l in lines if l.startswith("error:")]
    if code == 2 and errs:
        return f"on {where}: {errs[-1]}"
    if code == 97:
        return f"on {where}: the uploaded bundle folder vanished before the run"
    if code == 127:
        return f"on {where}: remote python {python!r} not found; set --remote-python (or ssh.python in the profile)"
    if code == 124:
        return f"on {where}: the benchmark hit the board-side timeout and was stopped"
    if code in (130, 137, 143) or (code is not None and code < 0):
        return f"on {where}: the benchmark process was killed (exit {code}) before it finished"
    return f"on {where}: the benchmark failed (exit {code}): {lines[-1] if lines else 'no message'}"


def clear_outputs(out: Path) -> None:
    """Remove the results and logs a previous run left in ``out``."""
    for stale in (RESULT_NAME, PARTIAL_NAME, "stdout.log", "stderr.log"):
        try:
            (out / stale).unlink()
        except FileNotFoundError:
            pass


def run_local(run_args: list[str], out_dir: str | os.PathLike, *, label: str = "local",
              timeout_s: float = 1800.0, python: Optional[str] = None,
              on_progress: Optional[ProgressFn] = None, env: Optional[dict[str, str]] = None) -> BoardRun:
    """Run ``python -m benchmarks.board.run_bench`` on this machine in a child process (so its peak
    memory and environment are the benchmark's own, as on a board). ``run_args`` must contain
    ``--out <out_dir>/result.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    py = python_argv(python) if python else [sys.executable]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    child_env.update(env or {})
    run = BoardRun(label=label, where="local", out_dir=out)
    t0 = time.monotonic()
    code, err, to = stream_process(py + ["-m", "benchmarks.board.run_bench", *run_args], stdin=subprocess.DEVNULL,
                            stdout_log=out / "stdout.log", stderr_log=out / "stderr.log", timeout_s=timeout_s,
                            on_line=progress_parser(label, on_progress), env=child_env)
    run.exit_code = code
    if to:
        run.error = f"locally: no result within the {timeout_s:g} s timeout; the run was stopped"
        run.environment = True
    elif code != 0:
        run.error = bench_error(code, err, "this machine", py[0])
    return finish_run(run, out, t0)


def finish_run(run: BoardRun, out: Path, t0: float, where: str = "") -> BoardRun:
    """Read the result / partial JSON the harness left in ``out``, settle ``ok`` and the duration
    (from ``time.monotonic()`` ``t0``), and record the run in ``out/remote.json``."""
    run.result = load_json(out / RESULT_NAME)
    run.partial = load_json(out / PARTIAL_NAME)
    if run.error is None and run.result is None:
        run.error = f"{where}the benchmark finished but wrote no {RESULT_NAME}"
    run.ok = run.error is None
    run.duration_s = time.monotonic() - t0
    atomic_write_json(out / "remote.json", run.to_json())
    return run
