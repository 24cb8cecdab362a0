"""``sglp-edge deploy``: put on a board, over SSH, the artifact that passed that device's constraints.

Layout on the board, under ``--to PATH`` (``~/...`` is the board's home)::

    PATH/releases/<id>/          artifact files, manifest.json, eval.json, run_model.py, SHA256SUMS
    PATH/current   -> releases/<id>     (a symlink, replaced atomically with rename(2))
    PATH/previous  -> releases/<old id> (kept for --rollback; older releases sglp-edge made are removed)
    PATH/.sglp-edge-releases.json       the releases sglp-edge made there: only those are ever removed

A release is unpacked into ``PATH/.incoming.XXXXXX``, its SHA-256 sums are checked on the board and
its runner answers one input there (``run_model.py``: numpy + the runtime only) before it is renamed
into ``releases/``; ``current`` is switched by a second ssh call, made only after the host saw the
first succeed, so an interrupted, corrupted or killed deploy never touches the running version.
``--rollback`` checks the previous release the same way before switching back to it. The board-side
scripts are in :mod:`sglp_edge.targets.deploy_board`.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import EnvironmentFault, UserError
from benchmarks.board.runner_base import artifact_files

from sglp_edge.profiles.load import python_argv
from sglp_edge.targets.deploy_board import INDEX, LOCK, check_previous_script, stage_script, switch_script
from sglp_edge.targets.ssh_transport import classify_ssh_error, sh_c

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "board" / "run_model.py"


@dataclass
class Release:
    device: str
    backend: str
    files: list[Path]  # artifact files + manifest
    artifact: str  # file name the runner loads
    eval_doc: dict[str, Any]
    verdict: str


def _report_targets(rep_path: Path) -> list[dict]:
    """The ``targets`` of a run's report.json, or one line saying the file is not a usable report."""
    bad = f"{rep_path} is not a report of `sglp-edge run`"
    try:
        rep = json.loads(rep_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{bad} (not UTF-8 text); re-run `sglp-edge run` to rebuild it") from None
    except ValueError as e:
        raise UserError(f"{bad} (invalid JSON: {getattr(e, 'msg', e)}, line {getattr(e, 'lineno', '?')}); "
                        "re-run `sglp-edge run` to rebuild it") from None
    targets = rep.get("targets", []) if isinstance(rep, dict) else None
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise UserError(f"{bad} (no list of targets in it); re-run `sglp-edge run` to rebuild it")
    return targets


def _compiled(t: dict, rep_path: Path) -> tuple[str, str]:
    """The backend and compile stage folder named by one target of the report, checked."""
    comp = t.get("compile")
    backend, stage = t.get("backend"), comp.get("stage") if isinstance(comp, dict) else None
    if not (isinstance(backend, str) and isinstance(stage, str) and re.fullmatch(r"[\w.+-]+", stage)
            and stage not in (".", "..")):
        raise UserError(f"{rep_path}: the {t.get('device')} target names no backend or compile stage folder; re-run "
                        "`sglp-edge run` to rebuild it")
    return backend, stage


def pick_release(run_dir: Path, device: str, force: bool = False) -> Release:
    """The pruned artifact of ``device`` in a finished run, refused when it failed or was not measured."""
    rep_path = Path(run_dir) / "report.json"
    if not rep_path.is_file():
        raise UserError(f"{rep_path} not found: give the folder of a finished `sglp-edge run`")
    all_targets = _report_targets(rep_path)
    targets = [t for t in all_targets if t.get("device") == device]
    if not targets:
        have = ", ".join(str(t.get("device", "?")) for t in all_targets) or "none"
        raise UserError(f"the run in {run_dir} has no results for device {device!r} (it has: {have})")
    t = targets[0]
    cons = [c for c in (t.get("constraints") or []) if isinstance(c, dict)]
    failed = [str(c.get("metric")) for c in cons if c.get("passed") is False]
    unmeasured = [str(c.get("metric")) for c in cons if c.get("passed") is None]
    if failed:
        verdict = f"FAILED {', '.join(failed)}"
    elif unmeasured or not t.get("measured", True):
        verdict = f"not measured: {', '.join(unmeasured) or 'all'}"
    else:
        verdict = "passed every constraint"
    if (failed or unmeasured or not t.get("measured", True)) and not force:
        raise UserError(f"refusing to deploy the {device} artifact: {verdict} in {rep_path}; measure it on the "
                        "board first, or pass --force to deploy it anyway")
    backend, stage = _compiled(t, rep_path)
    be = get_backend(backend)
    comp = Path(run_dir) / stage / "pruned"
    if be.folder_artifact:
        raise UserError(f"sglp-edge deploy of a {be.name} folder is not yet supported; copy the folder {comp} to the "
                        "board and run it with onnxruntime-genai (benchmarks/board/lm_genai.py shows how)")
    art = comp / be.board_artifact if be.board_artifact and (comp / be.board_artifact).is_file() else comp / be.artifact
    if not art.is_file():
        raise UserError(f"artifact {art} is missing from the run folder; re-run `sglp-edge run` to rebuild it")
    files = artifact_files(art, backend) + [p for p in (comp / "manifest.json",) if p.is_file()]
    eval_doc = {"device": device, "backend": backend, "precision": t.get("precision"), "verdict": verdict,
                "constraints": cons, "target": t.get("target"), "results": (t.get("results") or {}).get("pruned"),
                "run_dir": str(run_dir), "forced": bool(force and (failed or unmeasured))}
    return Release(device=device, backend=backend, files=files, artifact=art.name, eval_doc=eval_doc,
                   verdict=verdict)


def pack(rel: Release) -> tuple[bytes, str]:
    """The release as a tar (bytes) with SHA256SUMS, and its id (hash of the sums)."""
    blobs: dict[str, bytes] = {f.name: f.read_bytes() for f in rel.files}
    blobs["eval.json"] = json.dumps(rel.eval_doc, indent=2).encode()
    blobs["run_model.py"] = RUNNER.read_bytes()
    blobs["RELEASE.json"] = json.dumps({"artifact": rel.artifact, "backend": rel.backend, "device": rel.device,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in sorted(blobs.items()))
    rid = time.strftime("%Y%m%d-%H%M%S-") + hashlib.sha256(sums.encode()).hexdigest()[:10]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(blobs.items()) + [("SHA256SUMS", sums.encode())]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), rid


def _q(s: str) -> str:
    return shlex.quote(s)


def board_dir(to: str) -> str:
    """``--to`` as given, checked: an absolute folder, or ``~``/``~/...`` (the board's shell expands it)."""
    if not to or to.startswith("-") or any(c in to for c in "\n\r\0"):
        raise UserError(f"--to must be an absolute folder on the board, got {to!r}")
    if to.startswith("~") and not (to == "~" or to.startswith("~/")):
        raise UserError(f"--to {to!r}: only ~ or ~/... (the login user's home on the board) is expanded; "
                        "give an absolute folder such as /home/pi/model")
    if not to.startswith(("/", "~")):
        raise UserError(f"--to must be an absolute folder on the board (or ~/...), got {to!r}")
    return to.rstrip("/") or "/"


_PARENT_DEATH: list = []


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """preexec_fn on Linux: the ssh child is killed when deploy dies, even by SIGKILL."""
    if _PARENT_DEATH:
        prctl, parent = _PARENT_DEATH
        prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _preexec() -> Optional[Callable[[], None]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        _PARENT_DEATH[:] = [ctypes.CDLL(None, use_errno=True).prctl, os.getpid()]
    except (OSError, AttributeError):
        return None
    return _die_with_parent


def _ssh(target: Any, script: str, stdin: Optional[bytes] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(target.ssh_argv(sh_c(script)), input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout, preexec_fn=_preexec())
    except subprocess.TimeoutExpired:
        raise EnvironmentFault(f"deploy to {target.where} timed out after {timeout:g} s; the board keeps its current "
                               "version") from None


def _tags(out: bytes) -> dict[str, str]:
    """The ``SGLP_NAME=value`` lines a board script printed."""
    tags = {}
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("SGLP_") and "=" in line:
            k, v = line.split("=", 1)
            tags[k[5:]] = v
    return tags


_KEEPS = "the board keeps its current version"


def _fail(target: Any, p: subprocess.CompletedProcess, what: str, to: str = "") -> UserError:
    err = p.stderr.decode(errors="replace")
    if p.returncode == 255:  # a host key or a refused login is the user's to fix, an unreachable board is not
        why = classify_ssh_error(target, err)
        return (EnvironmentFault if " is unreachable (" in why else UserError)(why)
    tag = _tags(p.stderr).get("DEPLOY", "")
    code, _, detail = tag.partition(" ")
    w = f"{target.where}:{to}" if to else target.where
    user = {
        "bad-home": f"the board's $HOME is not an absolute folder, so --to {to!r} cannot be expanded; give an "
                    "absolute --to",
        "not-dir": f"--to {w} exists on the board and is not a folder; give another --to",
        "not-ours": f"--to {w} holds files sglp-edge did not put there (no {INDEX}); give a new or empty folder: "
                    "nothing in it was touched",
        "real-link": f"{w}/{detail} on the board is a real folder, not the symlink sglp-edge keeps there; move it "
                     f"away or give another --to; nothing was changed",
        "foreign": f"{w}/releases/{detail} exists on the board but sglp-edge did not make it; move it away; "
                   "nothing was changed",
        "changed": f"{w}/current changed on the board during {what} (another deploy?); nothing was switched, "
                   "re-run",
        "missing": f"release {detail} vanished from {w} during {what}; nothing was switched, re-run",
        "no-previous": f"nothing to roll back to on {w}: no previous release is kept there",
    }
    if code in user:
        return UserError(user[code])
    if code == "locked":
        return EnvironmentFault(f"another deploy into {w} is running; nothing was changed (re-run when it ends; a "
                                f"deploy killed on the board leaves {w}/{LOCK}: remove it)")
    if code == "hash-mismatch":
        files = f" ({detail.strip()})" if detail.strip() else ""
        if what == "rollback":
            return EnvironmentFault(f"rollback refused: the previous release on {w} fails its SHA-256 check{files}; "
                                    "current stays as it is; deploy the release again instead")
        return EnvironmentFault(f"{what} on {w}: the copy arrived corrupted (SHA-256 mismatch{files}); {_KEEPS}")
    if code == "runner-failed":
        which = "the previous release" if what == "rollback" else "the new release"
        return EnvironmentFault(f"{what} refused: the runner of {which} failed on {w}: {detail or 'no message'}; "
                                f"{_KEEPS} (--no-check skips this run)")
    last = [ln for ln in err.strip().splitlines() if ln.strip()]
    return EnvironmentFault(f"{what} on {w} failed (exit {p.returncode}): {last[-1] if last else 'no message'}; "
                            f"{_KEEPS}")


def _python(target: Any) -> str:
    return " ".join(_q(a) for a in python_argv(target.python))


def _runner_doc(tags: dict[str, str], target: Any) -> dict:
    try:
        return json.loads(tags.get("RUNNER", ""))
    except ValueError:
        raise EnvironmentFault(f"the runner on {target.where} printed no answer: {tags.get('RUNNER', '')[-300:]!r}; "
                               f"{_KEEPS}") from None


def _switch(target: Any, to: str, rid: str, expect: str, what: str) -> None:
    p = _ssh(target, switch_script(to, rid, expect, _python(target)))
    if p.returncode != 0 or b"SGLP_DEPLOY=ok" not in p.stdout:
        raise _fail(target, p, what, to)


def deploy(rel: Release, target: Any, to: str, *, payload: Optional[bytes] = None, check: bool = True) -> dict:
    """Install ``rel`` under ``to`` on the board: stage and verify it (hashes, then its runner when
    ``check``) in one ssh call, and switch ``current`` in a second, only after the first succeeded."""
    to = board_dir(to)
    data, rid = pack(rel)
    p = _ssh(target, stage_script(to, rid, _python(target), check), stdin=data if payload is None else payload)
    tags = _tags(p.stdout)
    if p.returncode != 0 or tags.get("DEPLOY") != "staged":
        raise _fail(target, p, "deploy", to)
    runner = _runner_doc(tags, target) if check else None
    _switch(target, to, rid, tags.get("CURRENT", ""), "deploy")
    out = {"release": rid, "path": f"{tags.get('DIR') or to}/current", "board": target.where, "verdict": rel.verdict}
    if runner is not None:
        out["runner"] = runner
    return out


def run_in_place(target: Any, to: str) -> dict:
    """Run the live release's runner on the board (``cd TO/current && python run_model.py``)."""
    to = board_dir(to)
    home = 'cd && ' if to.startswith("~") else ""
    rel = _q(to[2:] if to.startswith("~/") else "." if to == "~" else to)
    p = _ssh(target, f"{home}cd {rel}/current && {_python(target)} run_model.py", timeout=900)
    if p.returncode != 0:
        raise _fail(target, p, "the deployed runner", to)
    try:
        return json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EnvironmentFault(f"the deployed runner on {target.where} printed no answer: {p.stdout[-300:]!r}") from None


def rollback(target: Any, to: str, check: bool = True) -> str:
    """Switch ``current`` back to ``previous``, after checking its hashes and running its runner (``check``)."""
    to = board_dir(to)
    p = _ssh(target, check_previous_script(to, _python(target), check), timeout=900)
    tags = _tags(p.stdout)
    if p.returncode != 0 or tags.get("DEPLOY") != "verified":
        raise _fail(target, p, "rollback", to)
    if check:
        _runner_doc(tags, target)
    _switch(target, to, tags["PREVIOUS"], tags.get("CURRENT", ""), "rollback")
    return f"releases/{tags['PREVIOUS']}"
