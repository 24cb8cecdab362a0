"""Atomic file and folder writes (standard library only: runs on the board too).

Nothing half-written is ever left at the destination: content goes to a temporary sibling first
and is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from benchmarks.board.diskspace import disk_full_as_fault
from benchmarks.board.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the user's umask
        with disk_full_as_fault(path.parent), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename onto ``path`` on success only.
    For libraries that insist on writing a file by name (torch.save, onnx.save, ov.save_model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        with disk_full_as_fault(path.parent):
            yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` whole.
    On failure the temporary folder is removed and any previous ``path`` is left untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is an existing file; an output folder never replaces a file: choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs follow the user's umask
    try:
        with disk_full_as_fault(path.parent):
            yield tmp
            mark_output(tmp)
        _follow_umask(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists")
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---- output folders: what sglp-edge may replace ------------------------------------------------
#: every output folder sglp-edge writes holds this small file; only such folders are ever replaced
MARKER = ".sglp-edge"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _follow_umask(root: Path) -> None:
    """Libraries write some files 0600 (safetensors, tempfile): give every output the mode the
    user's umask asks for (executables keep their execute bits)."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        st = p.stat().st_mode
        want = 0o777 if (p.is_dir() or st & 0o100) else 0o666
        with contextlib.suppress(OSError):
            os.chmod(p, want & ~mask)


def mark_output(folder: str | os.PathLike, command: str | None = None) -> None:
    """Stamp a folder sglp-edge writes; ``command`` names one that updates its folder in place
    (``run``, ``bench``), so that a folder it started and was stopped in is still recognised."""
    p = Path(folder) / MARKER
    if not p.exists():
        p.write_text(json.dumps({"written_by": "sglp-edge", **({"command": command} if command else {})}) + "\n")


def is_sglp_output(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


#: result files of sglp-edge outputs (run/compile/train manifest, prune plan, bench summary, finetune
#: record, LM export, checkpoint and HF metadata): beside the marker, one of them makes a folder ours
RESULT_FILES = ("manifest.json", "plan.json", "summary.json", "finetune.json", "lm.json", "sglp_model.json",
                "sglp_prune.json")
#: the temporary names the writers above make, and nothing else: atomic_write_bytes / atomic_dir
#: (mkstemp/mkdtemp ``.NAME.XXXXXXXX.tmp``), atomic_path (``.NAME.PID.tmpSUFFIX``), atomic_dir's
#: replaced folder (``.NAME.old.PID``, a folder)
_TEMP_NAME = re.compile(r"\.[^/]+\.(?:[a-z0-9_]{8}\.tmp|\d+\.tmp(?:\.[^./]+)?)")
_OLD_NAME = re.compile(r"\.[^/]+\.old\.\d+")


def is_our_temp(p: Path) -> bool:
    if p.is_symlink():
        return False
    return bool(_TEMP_NAME.fullmatch(p.name)) or (p.is_dir() and bool(_OLD_NAME.fullmatch(p.name)))


def _bookkeeping(p: Path) -> bool:
    """The marker, our temporaries, and the empty ``.lock`` earlier versions kept inside a run folder."""
    if p.name == ".lock":
        return p.is_file() and not p.is_symlink() and p.stat().st_size == 0
    return p.name == MARKER or is_our_temp(p)


def _marker_command(folder: Path) -> str | None:
    try:
        doc = json.loads((folder / MARKER).read_text()[:4096])
    except (OSError, ValueError):
        return None
    return doc.get("command") if isinstance(doc, dict) else None


def owns(folder: str | os.PathLike, *, results: tuple = RESULT_FILES, command: str | None = None) -> bool:
    """Whether ``folder`` is an sglp-edge output: its marker AND one of ``results`` (a bare manifest.json
    or summary.json is the user's; so is a marker beside files we cannot recognise), or a marker that
    names ``command`` (a folder that command started), or nothing but the marker and our bookkeeping."""
    folder = Path(folder)
    if not is_sglp_output(folder):
        return False
    if any((folder / r).is_file() for r in results):
        return True
    if command is not None and _marker_command(folder) == command:
        return True
    return all(_bookkeeping(p) for p in folder.iterdir())


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_writable(path: str | os.PathLike, *, what: str = "--out") -> None:
    """One line before any work when ``path`` cannot be created: a parent is a file, or the
    nearest existing parent folder cannot be written (tried for real, so it holds for root too)."""
    path = Path(path)
    anc = path.parent if not path.exists() else path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{what} {path}: {anc} is a file, not a folder; choose a path under a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sglp-edge-probe.", dir=anc)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror} in {anc}); choose a folder you can write to") \
            from None
    os.close(fd)
    os.unlink(probe)


def check_out_dir(out: str | os.PathLike, *, force: bool = False, inputs: tuple = (), what: str = "--out",
                  reuse: bool = False, results: tuple = RESULT_FILES, command: str | None = None) -> Path:
    """Whether an output FOLDER may be written at ``out`` (call it before any heavy work).

    Refused, with one line naming the fix: an existing file (never turned into a folder); a folder
    holding one of ``inputs`` (or the current folder); a non-empty folder that is not ours (see
    :func:`owns`: ``results`` and ``command`` say what the writing command recognises as its own);
    one that is ours and holds results unless ``force`` (or ``reuse``: commands that update their
    own folder in place, like ``bench`` and ``run``); and a path that cannot be written. Nothing is
    written, deleted or stamped here."""
    out = Path(out)
    res = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(inp).resolve()
        if _contains(res, ip):
            raise UserError(f"{what} {out} holds the input {inp}; choose a new folder (nothing was deleted)")
    if _contains(res, Path.cwd().resolve()):
        raise UserError(f"{what} {out} is the current folder or one above it; choose a new folder (nothing was deleted)")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{what} {out} is an existing file; sglp-edge writes a folder there: choose a new path")
        entries = list(out.iterdir())
        if any(not (p.name == ".lock" and _bookkeeping(p)) for p in entries):
            if not owns(out, results=results, command=command):
                raise UserError(f"{what} {out} is a non-empty folder that sglp-edge did not write; choose a new or "
                                "empty folder (nothing was deleted)")
            if not (force or reuse or all(_bookkeeping(p) for p in entries)):
                raise UserError(f"{what} {out} holds an earlier sglp-edge output; pass --force to replace it")
    check_writable(out, what=what)
    return out


def check_out_file(out: str | os.PathLike, *, force: bool = False, inputs: tuple = (), what: str = "--out") -> Path:
    """Whether an output FILE may be written at ``out``: never over a folder, never over one of
    ``inputs``, an existing file only with ``force``; the parent must be writable."""
    out = Path(out)
    res = out.resolve()
    for inp in inputs:
        if inp is not None and Path(inp).resolve() == res:
            raise UserError(f"{what} {out} would overwrite the input {inp}; choose another path")
    if out.is_dir():
        raise UserError(f"{what} {out} is a folder; give a file path (e.g. {out / 'model.onnx'})")
    if out.exists() and not force:
        raise UserError(f"{what} {out} exists; pass --force to replace it")
    check_writable(out, what=what)
    return out


def _in_our_folder(folder: Path) -> bool:
    return any(is_sglp_output(d) for d in [folder, *folder.parents])


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed writer of this module left in ``folder`` (:func:`is_our_temp`
    names only), and only in a folder of ours (it, or a folder above it, carries the marker). Call it
    only while holding the folder's lock, so no live writer's temp goes."""
    gone: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir() or not _in_our_folder(folder.absolute()):
        return gone
    for p in folder.iterdir():
        if is_our_temp(p):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p)
    return gone


class FolderLock:
    """An exclusive, non-blocking lock on an output path, a folder or a file: a second writer gets one
    line (exit 2) instead of a mixed or lost output. The flock is on ``.<name>.lock`` BESIDE the path,
    in its parent folder: a folder that :func:`atomic_dir` replaces by rename stays guarded, and
    nothing is created inside a folder before it was checked. The lock file is removed on release
    when it is ours (it says so inside; a file of that name we did not make is only read, never
    changed or removed); one left by a killed process is reused. The lock ends with the process,
    even by SIGKILL."""

    SIGNATURE = b"sglp-edge lock\n"

    def __init__(self, path: str | os.PathLike, what: str = "folder"):
        p = Path(path).absolute()
        self.folder, self.what, self._fd = Path(path), what, None
        self.lockfile = p.parent.resolve() / f".{p.name}.lock"

    def _open(self) -> int:
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return os.open(self.lockfile, os.O_RDONLY)  # flock works on a read-only descriptor
        os.write(fd, self.SIGNATURE)
        return fd

    def acquire(self) -> "FolderLock":
        import fcntl  # POSIX only: kept local so the module still imports elsewhere

        self.lockfile.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = self._open()
            except FileNotFoundError:  # unlinked between the two opens by a releasing holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.what} {self.folder} is in use by another sglp-edge process; wait for it to "
                                "finish or choose another path") from None
            if self._same_file(fd):  # not a lock file a releasing holder unlinked meanwhile
                self._fd = fd
                return self
            os.close(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.lockfile)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            ours = os.pread(self._fd, len(self.SIGNATURE) + 1, 0) == self.SIGNATURE
            if ours and self._same_file(self._fd):  # unlinked while still held: a later opener sees it gone
                with contextlib.suppress(OSError):
                    os.unlink(self.lockfile)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
