"""Run the on-device benchmark on remote boards over SSH (and, with the same plumbing, locally).

Why OpenSSH's own ``ssh`` through :mod:`subprocess` rather than paramiko/asyncssh: it is already
on every workstation and board, it honours the user's ``~/.ssh/config`` (ProxyJump, agents,
certificates, ControlMaster) and ``known_hosts`` exactly as their interactive ``ssh`` does, and it
adds no dependency. Only ``ssh`` is used -- no ``scp``: the bundle goes up on the SSH session's
stdin (``cat > bundle.tar.gz``) and results come back as a tar stream on stdout, so no remote file
name ever passes through scp's remote-shell globbing.

Safety rules:

* locally every command is an argument list (never ``shell=True``); the destination is given after
  ``--`` and must not start with ``-``;
* the remote command string is built with :func:`shlex.quote` for every argument and run by
  ``sh -c`` (so it works whatever the user's login shell); artifact and data keep their names
  (spaces, quotes, ``;$()`` included) and are always quoted;
* ``StrictHostKeyChecking=yes`` by default (``accept-new`` only when asked), ``BatchMode=yes``
  (never a password prompt), ``ConnectTimeout``, ``ServerAliveInterval``/``CountMax``, an overall
  timeout per board (enforced locally, and on the board with coreutils ``timeout`` where present);
* whatever the board produced is kept locally: ``stdout.log``/``stderr.log`` are written as the
  output arrives, and after a failure or a timeout the finished stages
  (``result.partial.json``) are pulled back before the remote folder is removed.

Layout on the board (a fresh ``mktemp -d`` under ``remote_dir``)::

    bundle/  benchmarks/board/ artifact/<files> data/<eval.npz> MANIFEST.json results/

Layout locally, per board: ``<out>/<label>/{result.json | result.partial.json, stdout.log,
stderr.log, remote.json}``.

The pieces live in their own modules, and this one re-exports their names:

* :mod:`sglp_edge.targets.bundle` -- the upload bundle (:func:`make_bundle`);
* :mod:`sglp_edge.targets.ssh_transport` -- the connection settings and ``ssh`` argument list
  (:class:`SSHTarget`), :func:`sh_c`, the diagnosis of a failed ``ssh``;
* :mod:`sglp_edge.targets.board_run` -- the harness in a child process, its logs, progress and result
  record (:class:`BoardRun`), and the same run on this machine (:func:`run_local`);
* here -- the run on a board: upload, run, pull the results, clean up (:func:`run_remote`,
  :func:`run_remote_many`).
"""

from __future__ import annotations

import shlex
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.board.atomic import atomic_write_bytes

from sglp_edge.profiles.load import python_argv
from sglp_edge.targets.board_run import (EXIT_MARKER, BoardRun, ProgressFn, bench_error, clear_outputs, finish_run,
                                         progress_parser, stream_process)
from sglp_edge.targets.bundle import Bundle
from sglp_edge.targets.ssh_transport import SSHTarget, classify_ssh_error, sh_c


def remote_run_script(remote_dir: str, python: str, run_args: Sequence[str], env: dict[str, str],
                      timeout_s: Optional[float]) -> str:
    q = shlex.quote
    envs = " ".join(q(f"{k}={v}") for k, v in env.items())
    py = " ".join(q(a) for a in python_argv(python))
    cmd = f"env {envs} {py} -m benchmarks.board.run_bench " + " ".join(q(a) for a in run_args)
    lines = [f"cd {q(remote_dir + '/bundle')} || exit 97"]
    # no exec: the shell outlives the benchmark, so a benchmark killed by a signal becomes an exit
    # status (128+N) plus a marker line instead of ssh's generic 255
    if timeout_s:
        t = max(1, int(timeout_s))
        lines.append(f"if command -v timeout >/dev/null 2>&1; then timeout -k 10 {t} {cmd}; else {cmd}; fi")
    else:
        lines.append(cmd)
    lines += ["rc=$?", f'echo "{EXIT_MARKER}$rc" >&2', "exit $rc"]
    return "\n".join(lines)


@dataclass
class RemoteJob:
    target: SSHTarget
    bundle: Bundle
    run_args: list[str]  # run_bench args; paths relative to the bundle folder
    out_dir: Path
    timeout_s: float = 1800.0
    keep_remote: bool = False
    label: str = ""


def run_remote(job: RemoteJob, on_progress: Optional[ProgressFn] = None) -> BoardRun:
    """Push the bundle, run the benchmark, pull results. Board problems are reported in the
    returned :class:`BoardRun` (``ok=False`` + one-line ``error``), never raised, so several boards
    can run side by side; local misconfiguration raises :class:`UserError` up front."""
    t = job.target.validate()
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = _Session(t, job, out, BoardRun(label=job.label or t.label or t.host, where=t.where, out_dir=out), on_progress)
    clear_outputs(out)
    s.t_start = time.monotonic()
    s.deadline = s.t_start + float(job.timeout_s)
    try:
        _upload(s)  # 1. a private folder on the board, the bundle unpacked in it
        _bench(s)  # 2. the benchmark, its stdout/stderr landing in the local logs as they arrive
    except _BoardError as e:
        s.run.error = str(e)
        s.run.environment = e.environment
    finally:
        _pull_and_clean(s)  # 3. whatever results exist come back, the remote folder goes
        finish_run(s.run, out, s.t_start, where=f"on {t.where}: ")
    return s.run


@dataclass
class _Session:
    """One board run in progress: where, what, the run record and the clock."""

    t: SSHTarget
    job: RemoteJob
    out: Path
    run: BoardRun
    on_progress: Optional[ProgressFn]
    t_start: float = 0.0
    deadline: float = 0.0

    @property
    def label(self) -> str:
        return self.run.label

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, step: str, **kw: Any) -> None:
        self.run.steps.append({"step": step, "t_s": round(time.monotonic() - self.t_start, 3), **kw})

    def progress(self, done: int) -> None:
        if self.on_progress:
            self.on_progress(self.label, {"stage": "upload", "done": done, "total": 1})


def _prep_script(remote_dir: str) -> str:
    """Make a private folder under ``remote_dir`` and unpack the bundle arriving on stdin into it."""
    q = shlex.quote
    return (
        "set -e\n"
        f"base={q(remote_dir)}\n"
        'mkdir -p "$base"\n'
        'd=$(mktemp -d "$base/sglp-edge.XXXXXX")\n'
        'echo "SGLP_REMOTE_DIR=$d"\n'
        'mkdir "$d/bundle" && cd "$d/bundle"\n'
        "cat > ../bundle.tar.gz\n"
        "tar -xzf ../bundle.tar.gz && rm -f ../bundle.tar.gz\n"
        "mkdir -p results\n"
        'echo "SGLP_UNPACKED=1"\n'
    )


def _upload(s: _Session) -> None:
    """Upload and unpack the bundle (stdin carries the tar); a failure raises :class:`_BoardError`."""
    t = s.t
    seen: dict[str, str] = {}

    def on_prep(line: str) -> None:
        if "=" in line and line.startswith("SGLP_"):
            k, _, v = line.partition("=")
            seen[k] = v

    s.progress(0)
    with open(s.job.bundle.path, "rb") as fh:
        code, err, to = stream_process(t.ssh_argv(sh_c(_prep_script(t.remote_dir))), stdin=fh, stdout_log=None,
                                       stderr_log=s.out / "stderr.log", timeout_s=s.remaining(), on_line=on_prep)
    s.run.remote_dir = seen.get("SGLP_REMOTE_DIR")
    s.note("upload", exit_code=code, timed_out=to, remote_dir=s.run.remote_dir)
    if to:
        raise _BoardError(f"uploading to {t.where} timed out", environment=True)
    if code == 255:
        why = classify_ssh_error(t, err)  # a host key or a login refused is the user's to fix (not environment)
        raise _BoardError(why, environment=" is unreachable (" in why)
    if code != 0 or "SGLP_UNPACKED" not in seen:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit {code}"
        raise _BoardError(f"could not unpack the bundle on {t.where}: {last}")
    s.progress(1)


def _bench(s: _Session) -> None:
    """Run the benchmark in the unpacked bundle; its outcome is recorded on ``s.run``."""
    t, run = s.t, s.run
    script = remote_run_script(run.remote_dir, t.python, s.job.run_args, t.env, timeout_s=s.remaining())
    code, err, to = stream_process(t.ssh_argv(sh_c(script)), stdin=subprocess.DEVNULL, stdout_log=s.out / "stdout.log",
                                   stderr_log=s.out / "stderr.log", timeout_s=s.remaining(),
                                   on_line=progress_parser(s.label, s.on_progress))
    run.exit_code = code
    s.note("run", exit_code=code, timed_out=to)
    if to:
        run.error = f"on {t.where}: no result within the {s.job.timeout_s:g} s timeout; the run was stopped"
        run.environment = True
    elif code == 255 and EXIT_MARKER not in err:
        run.error = classify_ssh_error(t, err, during_run=True)
        run.environment = True
    elif code != 0:
        run.error = bench_error(code, err, t.where, t.python)


def _pull_and_clean(s: _Session) -> None:
    """Pull whatever results exist, then remove the remote folder (unless ``keep_remote``)."""
    t, run = s.t, s.run
    if not run.remote_dir:
        return
    _pull_results(t, run, s.out, grace_s=max(15.0, float(t.connect_timeout_s) * 3))
    if not s.job.keep_remote:
        rc, _, _ = stream_process(t.ssh_argv(sh_c(f"rm -rf {shlex.quote(run.remote_dir)}")),
                                  stdin=subprocess.DEVNULL, stdout_log=None, stderr_log=None,
                                  timeout_s=max(15.0, float(t.connect_timeout_s) * 3))
        s.note("cleanup", exit_code=rc)


class _BoardError(Exception):
    def __init__(self, msg: str, *, environment: bool = False):
        super().__init__(msg)
        self.environment = environment


def _pull_results(t: SSHTarget, run: BoardRun, out: Path, grace_s: float) -> None:
    """Stream ``results/`` back as a tar and place each file atomically under ``out``."""
    script = f"cd {shlex.quote(run.remote_dir + '/bundle/results')} && tar -cf - ."
    with tempfile.TemporaryDirectory(prefix=".pull.", dir=out) as tmp:
        tar_path = Path(tmp) / "results.tar"
        with open(tar_path, "wb") as fh:
            proc = subprocess.Popen(t.ssh_argv(sh_c(script)), stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.PIPE)
            try:
                _, err = proc.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                run.steps.append({"step": "pull", "timed_out": True})
                return
        run.steps.append({"step": "pull", "exit_code": proc.returncode})
        if proc.returncode != 0:
            return
        dest = Path(tmp) / "x"
        dest.mkdir()
        try:
            with tarfile.open(tar_path) as tar:
                members = []
                for m in tar.getmembers():
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    # plain files at the top level only; skip temporaries of interrupted atomic writes
                    if m.isfile() and name and "/" not in name and not name.startswith("."):
                        members.append(m)
                try:
                    tar.extractall(dest, members=members, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(dest, members=members)
        except tarfile.TarError:
            return
        for f in dest.iterdir():
            if f.is_file():
                atomic_write_bytes(out / f.name, f.read_bytes())


def run_remote_many(jobs: Sequence[RemoteJob], on_progress: Optional[ProgressFn] = None,
                    max_workers: Optional[int] = None) -> list[BoardRun]:
    """Run several boards concurrently (one thread each: the work is waiting on ssh)."""
    for j in jobs:
        j.target.validate()
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max_workers or len(jobs), thread_name_prefix="board") as pool:
        futs = [pool.submit(run_remote, j, on_progress) for j in jobs]
        return [f.result() for f in futs]

