"""Disk space: a cheap check before heavy work, and a full disk named as such when a write fails
(standard library only: runs on the board too).

Libraries report a full disk in their own words (``OSError: [Errno 28]``, safetensors'
``IoError(... StorageFull ...)``, a C++ stream's ``basic_ios::clear``); :func:`disk_full_as_fault`
turns any of them into one :class:`~benchmarks.board.errors.EnvironmentFault` line (exit status 4).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Optional

from benchmarks.board.errors import EnvironmentFault

#: below this many free bytes, a write that failed without saying why is taken as a full disk
NEARLY_FULL = 16 << 20
_FULL_WORDS = ("no space left", "storagefull", "os error 28", "errno 28", "code: 28", "disk quota exceeded")
_VAGUE_WRITE_WORDS = ("basic_ios::clear", "iostream error", "failed to write", "error while serializing",
                      "unable to write", "cannot write", "write failed", "could not write",
                      "pytorchstreamwriter failed", "inline_container", "unexpected pos")


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for an unprivileged user) on the disk that holds ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def check_free_space(path: str | os.PathLike, need_bytes: int, *, what: str = "--out") -> None:
    """One line before any work when the disk holding ``path`` has less than ``need_bytes`` free."""
    have = free_bytes(path)
    if have < need_bytes:
        raise EnvironmentFault(f"{what} {path}: its disk has {_mb(have)} free and this needs about {_mb(need_bytes)}; "
                               "free space there or choose a folder on another disk (nothing was written)")


def is_disk_full(e: BaseException, path: Optional[str | os.PathLike] = None) -> bool:
    """Whether ``e`` reports a full disk: by its errno, its words, or (for a write error that does not
    say why) by the disk holding ``path`` being nearly full now."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = f"{type(e).__name__}: {e}".lower()
    if any(w in text for w in _FULL_WORDS):
        return True
    if path is not None and any(w in text for w in _VAGUE_WRITE_WORDS):
        with contextlib.suppress(OSError):
            return free_bytes(path) < NEARLY_FULL
    return False


@contextlib.contextmanager
def disk_full_as_fault(path: str | os.PathLike, what: str = "writing") -> Iterator[None]:
    """Run a write; a full disk (however the library says it) becomes one EnvironmentFault line."""
    try:
        yield
    except EnvironmentFault:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        if not is_disk_full(e, path):
            raise
        raise EnvironmentFault(f"out of disk space {what} {path} ({_mb(_free_or_zero(path))} left on that disk); "
                               "free space there or choose another --out: nothing half-written was kept") from None


def _free_or_zero(path: str | os.PathLike) -> int:
    try:
        return free_bytes(path)
    except OSError:
        return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e9 else f"{n / 1e9:.1f} GB"
