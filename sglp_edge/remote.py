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

    bundle/  benchmarks/ exporters/ artifact/<files> data/<eval.npz> MANIFEST.json results/

Layout locally, per board: ``<out>/<label>/{result.json | result.partial.json, stdout.log,
stderr.log, remote.json}``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from exporters.atomic import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file
from exporters.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROGRESS_PREFIX = "@@sglp-progress "
RESULT_NAME = "result.json"
PARTIAL_NAME = "result.partial.json"
EXIT_MARKER = "SGLP_EDGE_EXIT="
ProgressFn = Callable[[str, dict[str, Any]], None]


# ------------------------------------------------------------------------------------------------
# Bundle
# ------------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    artifact: str  # path of the artifact inside the bundle (relative)
    data: Optional[str]  # path of the eval data inside the bundle (relative) or None
    sha256: str
    size_bytes: int


def _py_files(pkg: Path) -> list[Path]:
    return sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)


def make_bundle(artifact: str | os.PathLike, data: str | os.PathLike | None, dest: str | os.PathLike,
                *, artifact_files: Sequence[str | os.PathLike] | None = None) -> Bundle:
    """Write a self-contained ``.tar.gz``: ``benchmarks/``, ``exporters/`` (the board may need to
    build its engine), the artifact (with its side files, e.g. the IR ``.bin``) and the eval
    ``.npz``. Written atomically."""
    from benchmarks.runners import artifact_files as _files

    art = Path(artifact)
    if not art.is_file():
        raise UserError(f"artifact not found: {art}")
    files = [Path(f) for f in (artifact_files or _files(art, ""))]
    d = Path(data) if data else None
    if d is not None and not d.is_file():
        raise UserError(f"eval data not found: {d}")
    dest = Path(dest)
    manifest = {
        "artifact": f"artifact/{art.name}",
        "artifact_files": [f"artifact/{f.name}" for f in files],
        "data": f"data/{d.name}" if d else None,
        "artifact_sha256": sha256_file(art),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(dest) as tmp:
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            for pkg in ("benchmarks", "exporters"):
                for f in _py_files(REPO_ROOT / pkg):
                    tar.add(f, arcname=str(f.relative_to(REPO_ROOT)), recursive=False)
            for f in files:
                tar.add(f, arcname=f"artifact/{f.name}", recursive=False)
            if d is not None:
                tar.add(d, arcname=f"data/{d.name}", recursive=False)
            blob = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("MANIFEST.json")
            info.size = len(blob)
            info.mtime = int(time.time())
            import io

            tar.addfile(info, io.BytesIO(blob))
    return Bundle(path=dest, artifact=manifest["artifact"], data=manifest["data"], sha256=sha256_file(dest),
                  size_bytes=dest.stat().st_size)


# ------------------------------------------------------------------------------------------------
# SSH target and command construction
# ------------------------------------------------------------------------------------------------


@dataclass
class SSHTarget:
    host: str  # [user@]host
    port: int = 22
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    strict_host_key_checking: str = "yes"  # "yes" or "accept-new"
    connect_timeout_s: int = 10
    server_alive_interval_s: int = 5
    server_alive_count_max: int = 3
    ssh_config: Optional[str] = None  # -F FILE (e.g. /dev/null to ignore ~/.ssh/config)
    python: str = "python3"  # remote interpreter; a command line is allowed
    remote_dir: str = "/tmp"
    env: dict[str, str] = field(default_factory=dict)
    label: Optional[str] = None
    ssh_binary: str = "ssh"

    def validate(self) -> "SSHTarget":
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise UserError(f"bad host {self.host!r}: use user@board (no spaces, not starting with '-')")
        if not (1 <= int(self.port) <= 65535):
            raise UserError(f"bad SSH port {self.port}: use 1-65535")
        import shutil

        if shutil.which(self.ssh_binary) is None:
            raise UserError(f"the OpenSSH client ({self.ssh_binary}) is not installed here: apt install openssh-client")
        if self.strict_host_key_checking not in ("yes", "accept-new"):
            raise UserError("host key checking must be 'yes' (default) or 'accept-new'")
        if self.identity and not Path(self.identity).expanduser().is_file():
            raise UserError(f"SSH identity file not found: {self.identity}")
        if self.known_hosts and not Path(self.known_hosts).expanduser().parent.is_dir():
            raise UserError(f"known_hosts folder does not exist: {Path(self.known_hosts).parent}")
        for k in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise UserError(f"bad environment variable name {k!r}")
        from sglp_edge.profiles import python_argv

        python_argv(self.python)
        return self

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def ssh_argv(self, remote_command: str) -> list[str]:
        def opt_path(p: str) -> str:
            p = str(Path(p).expanduser())
            return f'"{p}"' if any(c.isspace() for c in p) else p

        argv = [self.ssh_binary]
        if self.ssh_config:
            argv += ["-F", str(Path(self.ssh_config).expanduser())]
        argv += [
            "-T",
            "-p", str(int(self.port)),
            "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={self.strict_host_key_checking}",
            "-o", f"ConnectTimeout={int(self.connect_timeout_s)}",
            "-o", f"ServerAliveInterval={int(self.server_alive_interval_s)}",
            "-o", f"ServerAliveCountMax={int(self.server_alive_count_max)}",
            "-o", "RequestTTY=no",
        ]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={opt_path(self.known_hosts)}"]
        if self.identity:
            argv += ["-i", str(Path(self.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
        argv += ["--", self.host, remote_command]
        return argv


def sh_c(script: str) -> str:
    """Wrap a POSIX sh script so that any login shell runs it unchanged."""
    return "sh -c " + shlex.quote(script)


def remote_run_script(remote_dir: str, python: str, run_args: Sequence[str], env: dict[str, str],
                      timeout_s: Optional[float]) -> str:
    from sglp_edge.profiles import python_argv

    q = shlex.quote
    envs = " ".join(q(f"{k}={v}") for k, v in env.items())
    py = " ".join(q(a) for a in python_argv(python))
    cmd = f"env {envs} {py} -m benchmarks.run_bench " + " ".join(q(a) for a in run_args)
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


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("result", None)
        d.pop("partial", None)
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        d["has_result"] = self.result is not None
        d["has_partial"] = self.partial is not None
        return d


def _classify_ssh_error(target: SSHTarget, stderr: str, during_run: bool = False) -> str:
    s = stderr or ""
    kh = target.known_hosts or "~/.ssh/known_hosts"
    if during_run:  # stderr also holds the benchmark's own output: only trust ssh's client messages
        ssh_lines = [l.strip() for l in s.splitlines()
                     if l.startswith(("ssh:", "Connection to", "client_loop", "Timeout, server", "Broken pipe"))]
        why = f" ({ssh_lines[-1]})" if ssh_lines else ""
        return (f"lost the SSH connection to {target.where} during the run{why}; the board rebooted, lost its "
                f"network or sshd stopped")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s:
        return (f"host key verification failed for {target.where}: the board's host key has CHANGED since it was "
                f"recorded in {kh}; if the board was reflashed, check its fingerprint and remove the old line with "
                f"ssh-keygen -R '[{target.host.split('@')[-1]}]:{target.port}' -f {kh}")
    if "Host key verification failed" in s or "No ED25519 host key is known" in s or "host key is not known" in s.lower():
        return (f"host key verification failed for {target.where}: its key is not in {kh} (checking is on). "
                f"Check the board's fingerprint, then add it: ssh-keyscan -p {target.port} "
                f"{target.host.split('@')[-1]} >> {kh} (or pass --accept-new-host-key once)")
    for needle in ("Connection refused", "Connection timed out", "timed out", "No route to host",
                   "Could not resolve hostname", "Network is unreachable", "Name or service not known",
                   "Connection reset", "Connection closed by"):
        if needle.lower() in s.lower():
            last = [l for l in s.strip().splitlines() if l.strip()]
            why = last[-1].strip() if last else needle
            return (f"board {target.where} is unreachable ({why}); check that it is powered and on the network, "
                    f"that sshd runs on port {target.port}, and the host name")
    if "Permission denied" in s:
        return (f"SSH login to {target.where} was refused (Permission denied); check the user name and "
                f"--identity (BatchMode is on: no password prompts)")
    last = [l for l in s.strip().splitlines() if l.strip()]
    return f"ssh to {target.where} failed: {last[-1].strip() if last else 'exit 255 with no message'}"


def _stream(argv: list[str], *, stdin: Any, stdout_log: Optional[Path], stderr_log: Optional[Path],
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


def _progress_parser(label: str, on_progress: Optional[ProgressFn]) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        if on_progress and line.startswith(PROGRESS_PREFIX):
            try:
                on_progress(label, json.loads(line[len(PROGRESS_PREFIX):]))
            except ValueError:
                pass

    return on_line


def _load_json(p: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _bench_error(code: Optional[int], stderr: str, where: str, python: str) -> str:
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


# ------------------------------------------------------------------------------------------------
# Remote run
# ------------------------------------------------------------------------------------------------


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
    label = job.label or t.label or t.host
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = BoardRun(label=label, where=t.where, out_dir=out)
    for stale in (RESULT_NAME, PARTIAL_NAME, "stdout.log", "stderr.log"):
        try:
            (out / stale).unlink()
        except FileNotFoundError:
            pass
    t_start = time.monotonic()
    deadline = t_start + float(job.timeout_s)
    log_out, log_err = out / "stdout.log", out / "stderr.log"

    def remaining() -> float:
        return deadline - time.monotonic()

    def note(step: str, **kw: Any) -> None:
        run.steps.append({"step": step, "t_s": round(time.monotonic() - t_start, 3), **kw})

    try:
        # 1. make a private folder, upload and unpack the bundle (stdin carries the tar)
        q = shlex.quote
        prep = (
            "set -e\n"
            f"base={q(t.remote_dir)}\n"
            'mkdir -p "$base"\n'
            'd=$(mktemp -d "$base/sglp-edge.XXXXXX")\n'
            'echo "SGLP_REMOTE_DIR=$d"\n'
            'mkdir "$d/bundle" && cd "$d/bundle"\n'
            "cat > ../bundle.tar.gz\n"
            "tar -xzf ../bundle.tar.gz && rm -f ../bundle.tar.gz\n"
            "mkdir -p results\n"
            'echo "SGLP_UNPACKED=1"\n'
        )
        seen: dict[str, str] = {}

        def on_prep(line: str) -> None:
            if "=" in line and line.startswith("SGLP_"):
                k, _, v = line.partition("=")
                seen[k] = v

        if on_progress:
            on_progress(label, {"stage": "upload", "done": 0, "total": 1})
        with open(job.bundle.path, "rb") as fh:
            code, err, to = _stream(t.ssh_argv(sh_c(prep)), stdin=fh, stdout_log=None, stderr_log=log_err,
                                    timeout_s=remaining(), on_line=on_prep)
        run.remote_dir = seen.get("SGLP_REMOTE_DIR")
        note("upload", exit_code=code, timed_out=to, remote_dir=run.remote_dir)
        if to:
            raise _BoardError(f"uploading to {t.where} timed out")
        if code == 255:
            raise _BoardError(_classify_ssh_error(t, err))
        if code != 0 or "SGLP_UNPACKED" not in seen:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {code}"
            raise _BoardError(f"could not unpack the bundle on {t.where}: {last}")
        if on_progress:
            on_progress(label, {"stage": "upload", "done": 1, "total": 1})

        # 2. run the benchmark (stdout/stderr land in the local logs as they arrive)
        script = remote_run_script(run.remote_dir, t.python, job.run_args, t.env, timeout_s=remaining())
        code, err, to = _stream(t.ssh_argv(sh_c(script)), stdin=subprocess.DEVNULL, stdout_log=log_out,
                                stderr_log=log_err, timeout_s=remaining(),
                                on_line=_progress_parser(label, on_progress))
        run.exit_code = code
        note("run", exit_code=code, timed_out=to)
        if to:
            run.error = f"on {t.where}: no result within the {job.timeout_s:g} s timeout; the run was stopped"
        elif code == 255 and EXIT_MARKER not in err:
            run.error = _classify_ssh_error(t, err, during_run=True)
        elif code != 0:
            run.error = _bench_error(code, err, t.where, t.python)
    except _BoardError as e:
        run.error = str(e)
    finally:
        # 3. pull whatever results exist, then remove the remote folder
        if run.remote_dir:
            _pull_results(t, run, out, grace_s=max(15.0, float(t.connect_timeout_s) * 3))
            if not job.keep_remote:
                rc, _, _ = _stream(t.ssh_argv(sh_c(f"rm -rf {shlex.quote(run.remote_dir)}")),
                                   stdin=subprocess.DEVNULL, stdout_log=None, stderr_log=None,
                                   timeout_s=max(15.0, float(t.connect_timeout_s) * 3))
                note("cleanup", exit_code=rc)
        run.result = _load_json(out / RESULT_NAME)
        run.partial = _load_json(out / PARTIAL_NAME)
        if run.error is None and run.result is None:
            run.error = f"on {t.where}: the benchmark finished but wrote no {RESULT_NAME}"
        run.ok = run.error is None
        run.duration_s = time.monotonic() - t_start
        atomic_write_json(out / "remote.json", run.to_json())
    return run


class _BoardError(Exception):
    pass


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


# ------------------------------------------------------------------------------------------------
# Local run (same result layout; the benchmark runs in a child process, as on a board)
# ------------------------------------------------------------------------------------------------


def run_local(run_args: list[str], out_dir: str | os.PathLike, *, label: str = "local",
              timeout_s: float = 1800.0, python: Optional[str] = None,
              on_progress: Optional[ProgressFn] = None, env: Optional[dict[str, str]] = None) -> BoardRun:
    """Run ``python -m benchmarks.run_bench`` on this machine in a child process (so its peak
    memory and environment are the benchmark's own, as on a board). ``run_args`` must contain
    ``--out <out_dir>/result.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_NAME, PARTIAL_NAME, "stdout.log", "stderr.log"):
        try:
            (out / stale).unlink()
        except FileNotFoundError:
            pass
    from sglp_edge.profiles import python_argv

    py = python_argv(python) if python else [sys.executable]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    child_env.update(env or {})
    run = BoardRun(label=label, where="local", out_dir=out)
    t0 = time.monotonic()
    code, err, to = _stream(py + ["-m", "benchmarks.run_bench", *run_args], stdin=subprocess.DEVNULL,
                            stdout_log=out / "stdout.log", stderr_log=out / "stderr.log", timeout_s=timeout_s,
                            on_line=_progress_parser(label, on_progress), env=child_env)
    run.exit_code = code
    if to:
        run.error = f"locally: no result within the {timeout_s:g} s timeout; the run was stopped"
    elif code != 0:
        run.error = _bench_error(code, err, "this machine", py[0])
    run.result = _load_json(out / RESULT_NAME)
    run.partial = _load_json(out / PARTIAL_NAME)
    if run.error is None and run.result is None:
        run.error = f"the benchmark finished but wrote no {RESULT_NAME}"
    run.ok = run.error is None
    run.duration_s = time.monotonic() - t0
    atomic_write_json(out / "remote.json", run.to_json())
    return run
