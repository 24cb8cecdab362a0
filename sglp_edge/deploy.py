"""``sglp-edge deploy``: put on a board, over SSH, the artifact that passed that device's constraints.

Layout on the board, under ``--to PATH``::

    PATH/releases/<id>/   artifact files, manifest.json, eval.json, run_model.py, SHA256SUMS
    PATH/current   -> releases/<id>     (a symlink, replaced atomically with rename(2))
    PATH/previous  -> releases/<old id> (kept for --rollback; older releases are removed)

A release is unpacked into ``PATH/.incoming.XXXXXX``, its SHA-256 sums are checked on the board,
and only then is it renamed into ``releases/`` and ``current`` switched: an interrupted or corrupted
copy never touches the running version. ``run_model.py`` (numpy + the runtime only) loads the model
and answers one input, so the user can check it in place; deploy runs it once on the board.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from exporters.errors import UserError

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run_model.py"


@dataclass
class Release:
    device: str
    backend: str
    files: list[Path]  # artifact files + manifest
    artifact: str  # file name the runner loads
    eval_doc: dict[str, Any]
    verdict: str


def pick_release(run_dir: Path, device: str, force: bool = False) -> Release:
    """The pruned artifact of ``device`` in a finished run, refused when it failed or was not measured."""
    from exporters.registry import get_backend

    rep_path = Path(run_dir) / "report.json"
    if not rep_path.is_file():
        raise UserError(f"{rep_path} not found: give the folder of a finished `sglp-edge run`")
    rep = json.loads(rep_path.read_text())
    targets = [t for t in rep.get("targets", []) if t.get("device") == device]
    if not targets:
        have = ", ".join(t.get("device", "?") for t in rep.get("targets", [])) or "none"
        raise UserError(f"the run in {run_dir} has no results for device {device!r} (it has: {have})")
    t = targets[0]
    cons = t.get("constraints") or []
    failed = [c["metric"] for c in cons if c.get("passed") is False]
    unmeasured = [c["metric"] for c in cons if c.get("passed") is None]
    if failed:
        verdict = f"FAILED {', '.join(failed)}"
    elif unmeasured or not t.get("measured", True):
        verdict = f"not measured: {', '.join(unmeasured) or 'all'}"
    else:
        verdict = "passed every constraint"
    if (failed or unmeasured or not t.get("measured", True)) and not force:
        raise UserError(f"refusing to deploy the {device} artifact: {verdict} in {rep_path}; measure it on the "
                        "board first, or pass --force to deploy it anyway")
    be = get_backend(t["backend"])
    comp = Path(run_dir) / t["compile"]["stage"] / "pruned"
    if be.folder_artifact:
        raise UserError(f"sglp-edge deploy of a {be.name} folder is not yet supported; copy the folder {comp} to the "
                        "board and run it with onnxruntime-genai (benchmarks/lm_genai.py shows how)")
    art = comp / be.board_artifact if be.board_artifact and (comp / be.board_artifact).is_file() else comp / be.artifact
    if not art.is_file():
        raise UserError(f"artifact {art} is missing from the run folder; re-run `sglp-edge run` to rebuild it")
    from benchmarks.runners import artifact_files

    files = artifact_files(art, t["backend"]) + [p for p in (comp / "manifest.json",) if p.is_file()]
    eval_doc = {"device": device, "backend": t["backend"], "precision": t.get("precision"), "verdict": verdict,
                "constraints": cons, "target": t.get("target"), "results": (t.get("results") or {}).get("pruned"),
                "run_dir": str(run_dir), "forced": bool(force and (failed or unmeasured))}
    return Release(device=device, backend=t["backend"], files=files, artifact=art.name, eval_doc=eval_doc,
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


def install_script(to: str, rid: str, python: str) -> str:
    """Board side: unpack into .incoming, verify every hash, rename into releases/, switch current."""
    return f"""set -e
to={_q(to)}; rid={_q(rid)}
mkdir -p "$to/releases"
inc=$(mktemp -d "$to/.incoming.XXXXXX")
trap 'rm -rf "$inc"' EXIT
tar -xf - -C "$inc"
cd "$inc"
if command -v sha256sum >/dev/null 2>&1; then sha256sum -c --quiet SHA256SUMS || {{ echo "SGLP_DEPLOY=hash-mismatch" >&2; exit 3; }}
else {python} -c 'import hashlib,sys
bad=[n for h,n in (l.split(None,1) for l in open("SHA256SUMS")) if hashlib.sha256(open(n.strip(),"rb").read()).hexdigest()!=h]
sys.exit(1 if bad else 0)' || {{ echo "SGLP_DEPLOY=hash-mismatch" >&2; exit 3; }}
fi
cd /
rm -rf "$to/releases/$rid"
mv "$inc" "$to/releases/$rid"
trap - EXIT
old=$(readlink "$to/current" 2>/dev/null || true)
ln -sfn "releases/$rid" "$to/.current.new" && mv -fT "$to/.current.new" "$to/current"
if [ -n "$old" ] && [ "$old" != "releases/$rid" ]; then
  ln -sfn "$old" "$to/.previous.new" && mv -fT "$to/.previous.new" "$to/previous"
fi
keep_prev=$(readlink "$to/previous" 2>/dev/null || true)
for r in "$to"/releases/*; do
  b="releases/$(basename "$r")"
  [ "$b" = "releases/$rid" ] || [ "$b" = "$keep_prev" ] || rm -rf "$r"
done
echo "SGLP_DEPLOY=ok"
"""


def rollback_script(to: str) -> str:
    return f"""set -e
to={_q(to)}
cur=$(readlink "$to/current" 2>/dev/null || true); prev=$(readlink "$to/previous" 2>/dev/null || true)
[ -n "$prev" ] && [ -d "$to/$prev" ] || {{ echo "SGLP_DEPLOY=no-previous" >&2; exit 4; }}
ln -sfn "$prev" "$to/.current.new" && mv -fT "$to/.current.new" "$to/current"
ln -sfn "$cur" "$to/.previous.new" && mv -fT "$to/.previous.new" "$to/previous"
echo "SGLP_DEPLOY=ok $prev"
"""


def _ssh(target: Any, script: str, stdin: Optional[bytes] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    from .ssh_transport import sh_c

    try:
        return subprocess.run(target.ssh_argv(sh_c(script)), input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"deploy to {target.where} timed out after {timeout:g} s; the board keeps its current "
                        "version") from None


def _fail(target: Any, p: subprocess.CompletedProcess, what: str) -> UserError:
    from .ssh_transport import _classify_ssh_error

    err = p.stderr.decode(errors="replace")
    if p.returncode == 255:
        return UserError(_classify_ssh_error(target, err))
    if "SGLP_DEPLOY=hash-mismatch" in err:
        return UserError(f"{what} on {target.where}: the copy arrived corrupted (SHA-256 mismatch); the board "
                         "keeps its current version")
    if "SGLP_DEPLOY=no-previous" in err:
        return UserError(f"nothing to roll back to on {target.where}: no previous release is kept there")
    last = [l for l in err.strip().splitlines() if l.strip()]
    return UserError(f"{what} on {target.where} failed (exit {p.returncode}): {last[-1] if last else 'no message'}; "
                     "the board keeps its current version")


def deploy(rel: Release, target: Any, to: str, *, payload: Optional[bytes] = None, check: bool = True) -> dict:
    """Install ``rel`` under ``to`` on the board and check that its runner answers there."""
    data, rid = pack(rel)
    py = " ".join(_q(a) for a in __import__("sglp_edge.profiles", fromlist=["x"]).python_argv(target.python))
    p = _ssh(target, install_script(to, rid, py), stdin=data if payload is None else payload)
    if p.returncode != 0 or b"SGLP_DEPLOY=ok" not in p.stdout:
        raise _fail(target, p, "deploy")
    out = {"release": rid, "path": f"{to}/current", "board": target.where, "verdict": rel.verdict}
    if check:
        out["runner"] = run_in_place(target, to)
    return out


def run_in_place(target: Any, to: str) -> dict:
    from .profiles import python_argv

    py = " ".join(_q(a) for a in python_argv(target.python))
    p = _ssh(target, f"cd {_q(to)}/current && {py} run_model.py", timeout=900)
    if p.returncode != 0:
        raise _fail(target, p, "the deployed runner")
    try:
        return json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise UserError(f"the deployed runner on {target.where} printed no answer: {p.stdout[-300:]!r}") from None


def rollback(target: Any, to: str) -> str:
    p = _ssh(target, rollback_script(to))
    if p.returncode != 0:
        raise _fail(target, p, "rollback")
    return p.stdout.decode().strip().split()[-1]
