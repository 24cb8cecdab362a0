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

from exporters.atomic import atomic_dir, atomic_write_json, sha256_file

MANIFEST = "manifest.json"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


class StageRunner:
    def __init__(self, run_dir: Path, *, force: bool = False, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.force = force
        self.log = log
        path = self.run_dir / MANIFEST
        self.manifest: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        self.ran: list[str] = []
        self.skipped: list[str] = []

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
