"""Resume and run-time plumbing of the training engine (:func:`sglp_edge.train.fit.fit`): the resumable
state file, RNG state and per-rank seeds, the SIGTERM / Ctrl-C stop flag and the progress display."""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from benchmarks.board.atomic import atomic_path
from benchmarks.board.errors import UserError

STATE_FORMAT = "sglp-edge/train-state/1"


# ---------------------------------------------------------------------------------------------
# state files
# ---------------------------------------------------------------------------------------------
def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The state file's contents on the CPU; ``mmap``: its tensors mapped from the file rather than
    read into memory (every rank of a sharded run reads the file, and the pages are shared)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
        raise UserError(f"cannot read the resume state {path} ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not an sglp-edge training state; delete it to start over")
    return state


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked after every step (main thread only)."""

    def __init__(self):
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if sys.platform != "win32":
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------------------------------
# progress display
# ---------------------------------------------------------------------------------------------
class Progress:
    """The run's progress on stderr: a live bar on a terminal, else a line every ``log_every`` steps
    (``enabled`` False: nothing, e.g. on ranks other than 0)."""

    def __init__(self, total: int | None, desc: str, enabled: bool, log_every: int):
        self.enabled, self.log_every, self.total = enabled, log_every, total
        self.progress = None
        self.task_id = None
        self.t0 = time.perf_counter()
        if not enabled:
            return
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        if self.live:
            self.progress = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                         console=self.console, transient=False)
            self.task_id = self.progress.add_task(desc, total=total, info="")
            self.progress.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, info=info)
        elif self.log_every and step % self.log_every == 0:
            tot = f"/{self.total}" if self.total else ""
            self.console.print(f"step {step}{tot} {info} [{time.perf_counter() - self.t0:.0f}s]", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------
# seeds and RNG state
# ---------------------------------------------------------------------------------------------
def rank_seed(seed: int, rank: int, step: int) -> int:
    """Rank 0 keeps ``seed`` (one process trains exactly as before); other ranks get streams of
    their own that no other seed's rank 0 shares."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2 ** 63)


def rng_state() -> dict[str, Any]:
    """The torch and Python generators' state, as the resume state file stores it."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore a state :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(s["python"]) if not isinstance(s["python"], tuple) else s["python"])
