"""Resumable stages of a run folder.

Every stage writes into its own sub-folder, atomically (a temporary folder renamed into place only
when the stage finished). ``manifest.json`` records for each finished stage the hash of its
inputs (configuration + the content hashes of the artifacts it consumed), the content hash of
every file it produced, its result and its wall time. A re-run skips a stage whose input hash is
unchanged and whose files still hash the same; a killed run resumes at the first unfinished stage.
Long stages (fine-tuning) may keep their own checkpoints under ``.work/<stage>`` so that even the
interrupted stage loses no work.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.board.atomic import (FolderLock, atomic_dir, atomic_write_json, check_out_dir, clean_stale_temps,
                              mark_output, sha256_file)
from benchmarks.board.errors import UserError

MANIFEST = "manifest.json"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


#: what makes a folder a run folder of ours (benchmarks.board.atomic.owns): the marker and the manifest, or a
#: marker naming `run` (a run stopped before its first stage)
OWN = {"results": (MANIFEST,), "command": "run"}


class StageRunner:
    def __init__(self, run_dir: Path, *, force: bool = False, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        # nothing in a folder that is not ours is touched: every check before the lock, the marker, the clean-up
        check_out_dir(self.run_dir, reuse=True, what="run folder", **OWN)
        # one writer per run folder: a second concurrent run gets one line instead of a mixed manifest (the lock
        # file lies beside the folder, so it exists only once the checks passed)
        self.lock = FolderLock(self.run_dir, "run folder").acquire()
        try:
            check_out_dir(self.run_dir, reuse=True, what="run folder", **OWN)  # again, under the lock
            self.manifest: dict[str, Any] = self._read_manifest(self.run_dir / MANIFEST)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mark_output(self.run_dir, command="run")
            self._clean(log)
        except BaseException:
            self.lock.release()
            raise
        self.force = force
        self.log = log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def _clean(self, log: Callable[[str], None]) -> None:
        """Our own temporaries a killed run left (SIGKILL, power loss), here and under .work."""
        work = self.run_dir / ".work"
        dirs = [self.run_dir, *([work, *(d for d in work.rglob("*") if d.is_dir())] if work.is_dir() else [])]
        for p in [p for d in dirs for p in clean_stale_temps(d)]:
            log(f"[clean] removed {p.name}, left by an interrupted run")

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {"stages": {}}
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({type(e).__name__}); delete it (every stage re-runs) or choose "
                            "another run folder") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict) or \
                not all(isinstance(v, dict) for v in doc["stages"].values()):
            raise UserError(f"{path} is not an sglp-edge run manifest; delete it (every stage re-runs) or choose "
                            "another run folder")
        return doc

    def close(self) -> None:
        self.lock.release()

    def _save(self) -> None:
        atomic_write_json(self.run_dir / MANIFEST, self.manifest)

    def is_done(self, name: str, inputs: dict[str, Any]) -> bool:
        rec = self.manifest["stages"].get(name)
        folder = self.run_dir / name
        if self.force or not rec or rec.get("status") != "done" or rec.get("input_hash") != stable_hash(inputs):
            return False
        if not folder.is_dir():
            return False
        return hash_tree(folder) == rec.get("files")

    def stage(self, name: str, inputs: dict[str, Any], fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(tmp_folder) -> result`` unless the stage is already done with these inputs."""
        if self.is_done(name, inputs):
            self.skipped.append(name)
            self.log(f"[skip] {name}: finished earlier with the same inputs")
            return self.manifest["stages"][name]["result"]
        self.log(f"[run ] {name}")
        self.manifest["stages"][name] = {"status": "running", "started": time.time()}
        self._save()
        t0 = time.perf_counter()
        with atomic_dir(self.run_dir / name) as tmp:
            result = fn(tmp)
        folder = self.run_dir / name
        self.manifest["stages"][name] = {
            "status": "done", "input_hash": stable_hash(inputs), "inputs": inputs, "files": hash_tree(folder),
            "result": result, "wall_s": time.perf_counter() - t0, "finished": time.time(),
        }
        self._save()
        self.ran.append(name)
        return result

    def file_hash(self, name: str, rel: str) -> str:
        return self.manifest["stages"][name]["files"][rel]
