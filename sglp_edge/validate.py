"""Cheap checks of values every command shares (stdlib only): a thread count, an SSH host, a path
(length, symbolic-link loops, a folder given where a file is expected). Each failure is one
:class:`~benchmarks.board.errors.UserError` line naming the fix, raised before any heavy work."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.board.errors import UserError

#: the most threads a command accepts. Past the cores, CPU threads only add contention: 4x the cores
#: leaves room for oversubscribing on purpose, and 64 keeps a config written for a large machine
#: usable on a small one. Far above that, torch's pools (intra-op, inter-op, OpenMP) each spawn the
#: count: --threads 5000 made ~10,000 threads (the machine ran out of processes) and 100000 crashed.
MAX_THREADS = max(4 * (os.cpu_count() or 1), 64)

#: the longest file name and path Linux takes (NAME_MAX, PATH_MAX)
NAME_MAX, PATH_MAX = 255, 4096

_HOST = re.compile(r"(?:[A-Za-z0-9._+-]+@)?(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.%A-Za-z]+\])")


def check_threads(name: str, value: Optional[int]) -> None:
    """``value`` threads: None or 0 = the runtime's default, else 1 .. :data:`MAX_THREADS`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THREADS:
        raise UserError(f"{name} must be between 1 and {MAX_THREADS} ({os.cpu_count()} cores here; 0 = default), "
                        f"got {value!r}")


def check_host(name: str, host: Optional[str]) -> None:
    """``host`` must look like [user@]board: never an ssh option (a leading '-'), no spaces."""
    if host is None:
        return
    if not isinstance(host, str) or not _HOST.fullmatch(host) or host.split("@")[-1].startswith("-"):
        raise UserError(f"bad host {host!r}: {name} must look like user@board or board (letters, digits, '.', '-', "
                        "'_'; not starting with '-')")


def check_path(path: os.PathLike | str, what: str) -> Path:
    """A path's length (a name over 255 bytes, a path over 4096) and symbolic-link loops, in one line."""
    p = Path(path)
    raw = os.fsencode(str(p))
    if len(raw) >= PATH_MAX:
        raise UserError(f"{what} {str(p)[:60]}... is {len(raw)} bytes long (the limit is {PATH_MAX - 1}); "
                        "choose a shorter path")
    for part in p.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{what}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long (the limit is "
                            f"{NAME_MAX}); choose a shorter name")
    probe = p
    while True:  # the path itself, or the first of its parents that exists, must not loop
        try:
            os.stat(probe)
            break
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{what} {p} is a symbolic link loop ({probe} points back at itself); give a "
                                "real path") from None
            if e.errno != errno.ENOENT or probe.parent == probe:
                break
            probe = probe.parent
    return p


def check_file(path: os.PathLike | str, what: str) -> Path:
    """An input that must be an existing file: a folder or a missing path is one line saying which."""
    p = check_path(path, what)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder, give a file")
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist")
    return p


def field_check(check: Callable[[str, Any], None], name: str, value: Any) -> Any:
    """Run one of these checks inside a pydantic validator (which reports a ValueError)."""
    try:
        check(name, value)
    except UserError as e:
        raise ValueError(str(e)) from None
    return value
