"""What the on-board benchmark tells the host while it runs (standard library only; no torch).

Progress goes to stdout as lines ``@@sglp-progress {json}`` (read by the host's progress bar); human
messages go to stderr. The result document is kept up to date in ``<out>.partial.json`` while the
run goes on (see benchmarks/board/run_bench.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.board.atomic import atomic_write_json

PROGRESS_PREFIX = "@@sglp-progress "


def progress(stage: str, done: int = 0, total: int = 0, **extra: Any) -> None:
    msg = {"stage": stage, "done": done, "total": total, **extra}
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(msg) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.json") if out.suffix != ".json" else out.with_suffix(".partial.json")


def mark_partial(out: Path, status: str, error: str) -> None:
    """Record how the run ended (failed, interrupted) in the partial file, if there is one."""
    part = partial_path(out)
    try:
        doc = json.loads(part.read_text())
    except (OSError, ValueError):
        return
    doc["status"] = status
    doc["error"] = error
    try:
        atomic_write_json(part, doc)
    except OSError:
        pass
