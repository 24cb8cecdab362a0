"""The upload bundle for a board: a self-contained ``.tar.gz`` with the board harness
(the ``benchmarks.board`` package and nothing else), the artifact with its side files, the eval data and a
``MANIFEST.json``. :mod:`sglp_edge.targets.remote` pushes it on the SSH session's stdin.

Layout inside the bundle::

    benchmarks/__init__.py benchmarks/board/ artifact/<files> data/<eval.npz> MANIFEST.json

A folder artifact (an onnxruntime-genai folder: model.onnx, genai_config.json, tokenizer) travels
whole as ``artifact/<folder>/<files>``; the harness is then given ``artifact/<folder>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.board.atomic import atomic_path, sha256_file
from benchmarks.board.errors import UserError
from benchmarks.board.runner_base import artifact_files as board_artifact_files

from sglp_edge.targets.board_run import REPO_ROOT


@dataclass
class Bundle:
    path: Path
    artifact: str  # path of the artifact inside the bundle (relative)
    data: Optional[str]  # path of the eval data inside the bundle (relative) or None
    sha256: str
    size_bytes: int


def board_files() -> list[Path]:
    """What of this repository goes to a board: ``benchmarks/__init__.py`` and the ``benchmarks.board``
    package (which imports nothing outside itself)."""
    board = REPO_ROOT / "benchmarks" / "board"
    return [REPO_ROOT / "benchmarks" / "__init__.py"] + sorted(p for p in board.rglob("*.py") if "__pycache__" not in p.parts)


def sha256_of_files(files: Sequence[Path]) -> str:
    """One hash for a folder artifact: sha256 over the sorted ``name sha256`` lines of its files."""
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def make_bundle(artifact: str | os.PathLike, data: str | os.PathLike | None, dest: str | os.PathLike,
                *, artifact_files: Sequence[str | os.PathLike] | None = None) -> Bundle:
    """Write a self-contained ``.tar.gz``: the board package (``benchmarks/board/``: the harness, its
    runners and the TensorRT engine build), the artifact (with its side files, e.g. the IR ``.bin``) and the eval
    ``.npz``. Written atomically."""
    art = Path(artifact)
    if art.is_dir():  # a folder artifact: every file in it (flat), under artifact/<folder>/
        files = sorted(f for f in art.iterdir() if f.is_file())
        if not files:
            raise UserError(f"artifact folder {art} is empty")
        prefix = f"artifact/{art.name}/"
        art_sha = sha256_of_files(files)
    elif not art.is_file():
        raise UserError(f"artifact not found: {art}")
    else:
        files = [Path(f) for f in (artifact_files or board_artifact_files(art, ""))]
        prefix, art_sha = "artifact/", sha256_file(art)
    d = Path(data) if data else None
    if d is not None and not d.is_file():
        raise UserError(f"eval data not found: {d}")
    dest = Path(dest)
    manifest = {
        "artifact": f"artifact/{art.name}",
        "artifact_files": [prefix + f.name for f in files],
        "data": f"data/{d.name}" if d else None,
        "artifact_sha256": art_sha,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(dest) as tmp:
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            for f in board_files():
                tar.add(f, arcname=str(f.relative_to(REPO_ROOT)), recursive=False)
            for f in files:
                tar.add(f, arcname=prefix + f.name, recursive=False)
            if d is not None:
                tar.add(d, arcname=f"data/{d.name}", recursive=False)
            blob = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("MANIFEST.json")
            info.size = len(blob)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(blob))
    return Bundle(path=dest, artifact=manifest["artifact"], data=manifest["data"], sha256=sha256_file(dest),
                  size_bytes=dest.stat().st_size)
