"""Helpers shared by the CLI commands: one-line errors, the interrupt exit status, and the guard
on ``--out`` (what may be written where; see :func:`benchmarks.board.atomic.check_out_dir`)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import threading
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from benchmarks.board.atomic import FolderLock, check_out_dir, check_out_file
from benchmarks.board.diskspace import check_free_space
from benchmarks.board.errors import EXIT_INTERNAL, EXIT_USER, UserError, describe_os_error, exit_code
from sglp_edge.train.interrupted import Interrupted
from sglp_edge.validate import check_path

F = TypeVar("F", bound=Callable)

#: exit status of an interrupted command (Ctrl-C / SIGTERM); the others are in benchmarks/board/errors.py
EXIT_INTERRUPTED = 130


def _sigterm_as_interrupt(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise KeyboardInterrupt


def user_errors(fn: F) -> F:
    """Turn a UserError (or a missing file) into one line on stderr and exit code 2 (4 for an
    :class:`~benchmarks.board.errors.EnvironmentFault`), an interruption (Ctrl-C, SIGTERM, or a training
    run's :class:`~sglp_edge.train.interrupted.Interrupted`) into one line and exit code 130, and anything else into one line too (see :func:`_last_resort`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old, held = None, len(_HELD)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
                signal.SIG_DFL, None):
            old = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(exit_code(e))
        except FileNotFoundError as e:
            typer.echo(f"error: file not found: {e.filename or e}", err=True)
            sys.exit(EXIT_USER)
        except KeyboardInterrupt:
            typer.echo("interrupted: stopped before finishing; nothing half-written was kept, re-run the same command "
                       "to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Interrupted as e:  # a training run stopped after saving its state
            typer.echo(f"interrupted: {e}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (SystemExit, typer.Exit):
            raise
        except Exception as e:  # noqa: BLE001
            _last_resort(e)
        finally:
            while len(_HELD) > held:  # the --out locks this command took (hold_out)
                _HELD.pop().release()
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    return wrapper  # type: ignore[return-value]


def _last_resort(e: BaseException) -> None:
    """Anything else still ends in one line: an OSError a user can act on (disk full, name too long,
    a link loop) is 4 or 2, and an unexpected error is 5 with its traceback kept in a file
    (``SGLP_EDGE_TRACEBACK=1`` prints it instead)."""
    if isinstance(e, OSError):
        said = describe_os_error(e)
        if said is not None:
            typer.echo(f"error: {said[0]}", err=True)
            sys.exit(said[1])
    if os.environ.get("SGLP_EDGE_TRACEBACK"):
        raise e
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    fd, path = tempfile.mkstemp(prefix="sglp-edge-error.", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    typer.echo(f"error: internal error ({type(e).__name__}: {msg}); this is a bug in sglp-edge: the traceback is in "
               f"{path} (SGLP_EDGE_TRACEBACK=1 prints it)", err=True)
    sys.exit(EXIT_INTERNAL)


def guard_out_dir(out: Path, *, force: bool = False, inputs: tuple = (), reuse: bool = False, **own: Any) -> Path:
    """Refuse, before any work, an ``--out`` folder whose contents would be lost (see
    :func:`benchmarks.board.atomic.check_out_dir`; ``own``: its ``results`` / ``command``)."""
    check_path(out, "--out")  # a name too long, a symbolic-link loop: one line
    checked = check_out_dir(out, force=force, inputs=tuple(_input_paths(inputs)), reuse=reuse, **own)
    check_space(out, inputs)
    return checked


#: the --out locks the running command holds; user_errors releases them when the command ends
_HELD: list = []


def hold_out(out: Path, *, file: bool = False, **check: Any) -> Any:
    """Take ``--out``'s lock (:class:`benchmarks.board.atomic.FolderLock`, beside it) for the rest of the
    command, once the cheap checks passed: a second concurrent writer gets one line and exit 2. The
    --out check runs again under the lock (a writer that just finished may have filled it); ``check``:
    the arguments of :func:`guard_out_dir` (or :func:`guard_out_file` with ``file``)."""
    lock = FolderLock(out, "--out").acquire()
    _HELD.append(lock)
    (guard_out_file if file else guard_out_dir)(out, **check)
    return lock


def guard_out_file(out: Path, *, force: bool = False, inputs: tuple = ()) -> Path:
    check_path(out, "--out")
    checked = check_out_file(out, force=force, inputs=tuple(_input_paths(inputs)))
    check_space(out, inputs)
    return checked


#: the output of a command takes about this many times its model's size on disk (an ONNX export,
#: a compiled artifact and its manifest), and never less than MIN_FREE
SPACE_FACTOR = 2.0
MIN_FREE = 1 << 20


def check_space(out: Path, inputs: tuple, factor: float = SPACE_FACTOR) -> None:
    """One line (exit 4) before any work when the disk under ``out`` cannot hold ``factor`` x the
    size of the model (the first of ``inputs``: a path, or a shipped model's name)."""
    check_free_space(out, max(MIN_FREE, int(factor * model_bytes(inputs[0] if inputs else None))))


def model_bytes(model: Any) -> int:
    """Bytes the model takes on disk: a file, a folder's files, or a shipped model's folder; 0 when unknown."""
    if model is None:
        return 0
    paths = _input_paths((model,))
    if not paths:
        from sglp_edge.models.registry import SHIPPED  # heavy: torch

        paths = [SHIPPED[str(model)]] if str(model) in SHIPPED else []
    total = 0
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
        total += sum(f.stat().st_size for f in files if f.suffix in MODEL_SUFFIXES)
    return total


#: what counts as model weights on disk (a data folder given first is not the model)
MODEL_SUFFIXES = {".onnx", ".data", ".safetensors", ".pt", ".pth", ".pt2", ".gguf", ".xml", ".bin", ".engine", ".plan"}


def _input_paths(inputs: tuple) -> list[Optional[Path]]:
    """Inputs named on the command line that are paths on disk (model names like 'default' are not)."""
    out: list[Optional[Path]] = []
    for i in inputs:
        if i is None:
            continue
        s = str(i)
        if ":" in s and not Path(s).exists():  # torchvision:resnet18, file.py:fn, imagefolder:DIR
            head, _, tail = s.partition(":")
            s = tail if head == "imagefolder" else head
        p = Path(s)
        if p.exists():
            out.append(p)
    return out


def positive(name: str, value: Any, *, zero_ok: bool = False) -> None:
    """One line for a number option that must be positive (or >= 0)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not zero_ok):
        raise UserError(f"{name} must be {'>= 0' if zero_ok else '> 0'} (got {value})")


def _artifact_io_shapes(artifact: Path) -> tuple[Optional[list], Optional[list]]:
    """(first input shape, first output shape) of an ONNX file or OpenVINO IR, None for a dynamic
    dimension; (None, None) when the format is not read here (TensorRT engines)."""
    if artifact.suffix == ".onnx":
        import onnx  # heavy: onnx

        g = onnx.load(str(artifact), load_external_data=False).graph
        init = {i.name for i in g.initializer}
        ins = [i for i in g.input if i.name not in init]

        def dims(v):
            return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

        return (dims(ins[0]) if ins else None), (dims(g.output[0]) if g.output else None)
    if artifact.suffix == ".xml":
        for layer in ET.parse(artifact).getroot().iter("layer"):
            if layer.get("type") == "Parameter":
                data = layer.find("data")
                shape = (data.get("shape") if data is not None else "") or ""
                return [int(d) if d.strip().isdigit() else None for d in shape.split(",") if d.strip()], None
    return None, None


def check_bench_data(artifact: Path, data: Path) -> None:
    """Before any latency pass: the evaluation data's shape against the artifact's input, and its
    labels against the artifact's outputs (one line naming the fix)."""
    from benchmarks.board.calib import load_npz  # heavy: numpy; the CLI starts without it

    d = load_npz(data, what="eval data")
    try:
        want_in, want_out = _artifact_io_shapes(artifact)
    except Exception:  # noqa: BLE001 - an unreadable artifact is reported by the benchmark itself
        return
    got = list(d.x.shape)
    if want_in and (len(want_in) != len(got) or any(w not in (None, 0) and w != g for w, g in zip(want_in[1:], got[1:]))):
        shown = ["N" if w in (None, 0) else w for w in want_in]
        raise UserError(f"--data {data} holds inputs of shape {got} but {artifact.name} takes {shown}; "
                        "make the eval data for this model (sglp-edge run writes eval_data/*.npz)")
    if d.y is not None and want_out and len(want_out) == 2 and want_out[1]:
        n = int(want_out[1])
        if len(d.y) and int(d.y.max()) >= n:
            raise UserError(f"--data {data} has labels up to {int(d.y.max())} but {artifact.name} has {n} outputs: "
                            "those samples would score 0 % top-1; use labels of this model's classes")


#: what a model file the user was sent may run: nothing, unless one of these flags says so
TRUST_BUILDER_HELP = ("run the builder file a checkpoint folder names (file.py:fn or .pt2) even though its sha256 "
                      "is not the one saved with the checkpoint; without it such a checkpoint is refused and "
                      "nothing runs")
TRUST_REMOTE_CODE_HELP = ("run the Python code a Hugging Face folder ships (auto_map in config.json); without it "
                          "such a folder is refused in one line, never prompted")


def trust_builder_option() -> Any:
    return typer.Option(False, "--trust-builder", help=TRUST_BUILDER_HELP)


def trust_remote_code_option() -> Any:
    return typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)
