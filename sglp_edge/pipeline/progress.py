"""Progress of a long analysis: rich bars on a terminal, plain timestamped lines otherwise.

With output redirected to a file (a CI log, ``nohup``) rich draws nothing until the end, so a job
of an hour looks dead. :class:`PlainProgress` has the part of rich's ``Progress`` interface the
analysis uses (``add_task`` / ``advance`` / ``update``, a context manager) and prints one line when
a stage starts, one every ``every`` steps (about a tenth of the stage) or ``max_quiet_s`` seconds,
and one when it ends, each with the elapsed time and an ETA."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


@dataclass
class _Task:
    description: str
    total: Optional[float]
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    last_count: float = 0.0
    done: bool = False


class PlainProgress:
    """Line-per-milestone progress for output that is not a terminal."""

    def __init__(self, stream: Optional[TextIO] = None, *, max_quiet_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.max_quiet_s = max_quiet_s
        self.clock = clock
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        for t in self.tasks.values():
            if not t.done and t.total is not None and t.completed >= t.total:
                self._line(t, "done")
                t.done = True

    def add_task(self, description: str, total: Optional[float] = None, **_kw: Any) -> int:
        now = self.clock()
        tid = len(self.tasks)
        t = self.tasks[tid] = _Task(description, total, started=now, last_line=now)
        self._line(t, f"start ({int(total)} steps)" if total else "start")
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, completed=self.tasks[task_id].completed + advance)

    def update(self, task_id: int, *, completed: Optional[float] = None, total: Optional[float] = None,
               **_kw: Any) -> None:
        t = self.tasks[task_id]
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if t.done:
            return
        if t.total is not None and t.completed >= t.total:
            self._line(t, "done")
            t.done = True
            return
        every = max(1.0, (t.total or 10) / 10)
        if t.completed - t.last_count >= every or self.clock() - t.last_line >= self.max_quiet_s:
            self._line(t, "")

    def _line(self, t: _Task, what: str) -> None:
        now = self.clock()
        elapsed = now - t.started
        count = f"{int(t.completed)}/{int(t.total)}" if t.total else f"{int(t.completed)}"
        eta = ""
        if not what and t.total and t.completed > 0:
            eta = f", ETA {_fmt(elapsed / t.completed * (t.total - t.completed))}"
        if what.startswith("start"):
            body = what
        elif what == "done":
            body = f"done {count} in {_fmt(elapsed)}"
        else:
            body = f"{count}, {_fmt(elapsed)} elapsed{eta}"
        print(f"[{time.strftime('%H:%M:%S')}] {t.description}: {body}", file=self.stream, flush=True)
        t.last_line, t.last_count = now, t.completed


def analysis_progress(stream: Optional[TextIO] = None) -> Any:
    """Rich bars when ``stream`` (default stderr) is a terminal, else :class:`PlainProgress` lines."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=False)
    return PlainProgress(stream)

