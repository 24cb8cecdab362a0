"""The ``.npz`` data format, one module for every reader and writer (numpy only: runs on the board too).

Calibration / parity data (the torch side writes with :func:`save_npz`, the exporters read with
:func:`load_npz`):

* ``x``       - float32 NCHW images, or int64 token ids ``(N, T)``  (required)
* ``y``       - int64 labels ``(N,)``                                  (optional)
* ``logits``  - float32 reference outputs of the PyTorch model for ``x`` (optional; when present,
                backend parity is measured against PyTorch itself rather than ONNX Runtime FP32)

Evaluation data of the on-board benchmark (:func:`load_eval_npz`, read by
``benchmarks/board/accuracy.py``); the same file as above is accepted, and more:

==================  ===========================================================================
``x``               the inputs of a single-input model, leading axis = samples (N, ...)
``<input name>``    or one array per model input, named exactly like the model's inputs
                    (e.g. ``input_ids`` and ``attention_mask`` for a language model)
``y``               integer class labels (N,) -> top-1 accuracy (classification)
``ref_logits``      the PyTorch model's outputs for the same samples (``logits`` is accepted too,
                    as written by :func:`save_npz`) -> agreement of the compiled
                    artifact with PyTorch (top-1 agreement, max/mean abs difference, allclose
                    with a per-precision tolerance)
``baseline_top1``   scalar: the *unpruned* model's top-1 (%) on the same samples ->
                    ``accuracy_drop_pct`` = baseline_top1 - top1 (percentage points)
``baseline_ppl``    scalar: the unpruned model's perplexity -> ``ppl_increase_pct``
``task``            optional scalar string ``classification`` | ``lm``; inferred otherwise
                    (``y`` present -> classification; ``input_ids``, or integer ``x`` of shape
                    (N, T), -> lm)
==================  ===========================================================================

Every file is read by :func:`read_npz` (never unpickles); anything wrong with a file is a
:class:`UserError` that names the fix. (The board's decoder-LM eval data, token ids only, is
``benchmarks/board/lm_bench.py``'s, read through :func:`read_npz` too.)
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np

from benchmarks.board.atomic import atomic_write_bytes, sha256_file
from benchmarks.board.errors import UserError

NPZ_HELP = ("an .npz with array 'x' (float32 NCHW images or int64 token ids), optional 'y' (labels) "
            "and optional 'logits' (PyTorch reference outputs)")
EVAL_HELP = ("an .npz with the inputs as 'x' (or one array per model input name), labels 'y' or token ids, "
             "written with numpy.savez")


def read_npz(path: str | Path, *, what: str, fix: str) -> Dict[str, np.ndarray]:
    """Every array of an ``.npz`` (never executes pickled code); a missing or unreadable file is a
    :class:`UserError` naming ``what`` it should hold (``fix``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{what} file {path} is not a readable .npz ({type(e).__name__}: {e}); "
                        f"re-create it with numpy.savez as {fix}") from None


@dataclass
class CalibData:
    x: np.ndarray
    y: np.ndarray | None = None
    logits: np.ndarray | None = None
    path: str | None = None
    sha256: str | None = None

    @property
    def kind(self) -> str:
        return "tokens" if np.issubdtype(self.x.dtype, np.integer) else "image"

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def head(self, n: int | None) -> "CalibData":
        """The first ``n`` samples (all when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self):
            return self
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return CalibData(self.x[:n], cut(self.y), cut(self.logits), self.path, self.sha256)

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "samples": len(self), "kind": self.kind,
                "x_shape": list(self.x.shape), "x_dtype": str(self.x.dtype),
                "has_labels": self.y is not None, "has_reference_logits": self.logits is not None}


def load_npz(path: str | Path, *, require_labels: bool = False, what: str = "calibration data") -> CalibData:
    """Load and validate an ``.npz`` (see module doc). Never executes pickled code."""
    path = Path(path)
    arrays = read_npz(path, what=what, fix=NPZ_HELP)
    if "x" not in arrays:
        raise UserError(f"{what} file {path} has no array 'x' (found {sorted(arrays)}); give {NPZ_HELP}")
    x = arrays["x"]
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"{what} file {path}: 'x' must be a non-empty batch (N, ...), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise UserError(f"{what} file {path}: 'x' contains NaN or inf values; fix the preprocessing")
    elif np.issubdtype(x.dtype, np.integer):
        x = np.ascontiguousarray(x, dtype=np.int64)
    else:
        raise UserError(f"{what} file {path}: 'x' has dtype {x.dtype}; use float32 images or int64 token ids")
    y = arrays.get("y")
    if y is not None:
        y = np.asarray(y).astype(np.int64).reshape(-1) if np.issubdtype(np.asarray(y).dtype, np.integer) else None
        if y is None or y.shape[0] != x.shape[0]:
            raise UserError(f"{what} file {path}: 'y' must hold one integer label per sample of 'x'")
    if require_labels and y is None:
        raise UserError(f"{what} file {path} has no labels 'y'; labels are needed to measure accuracy")
    logits = arrays.get("logits")
    if logits is not None:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.shape[0] != x.shape[0]:
            raise UserError(f"{what} file {path}: 'logits' must have one row per sample of 'x'")
    return CalibData(x, y, logits, str(path), sha256_file(path))


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray | None = None, logits: np.ndarray | None = None) -> Path:
    """Write an ``.npz`` atomically (compressed)."""
    arrays = {"x": np.asarray(x)}
    if y is not None:
        arrays["y"] = np.asarray(y, dtype=np.int64)
    if logits is not None:
        arrays["logits"] = np.asarray(logits, dtype=np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def batches(x: np.ndarray, batch_size: int, *, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Consecutive contiguous batches of ``x``; the last one may be short unless ``drop_last``."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    n = x.shape[0]
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        yield np.ascontiguousarray(x[i:i + batch_size])


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def check_matches_input(data: CalibData, input_shape: list, input_dtype: str, *, what: str = "calibration data") -> None:
    """Fail early when the data cannot feed the model's first input (rank, fixed dims, dtype)."""
    x = data.x
    want_int = input_dtype.startswith("int")
    if want_int != np.issubdtype(x.dtype, np.integer):
        raise UserError(f"{what} {data.path}: 'x' is {x.dtype} but the model input expects {input_dtype}")
    if len(input_shape) != x.ndim:
        raise UserError(f"{what} {data.path}: 'x' has shape {list(x.shape)} but the model input has rank "
                        f"{len(input_shape)} ({input_shape}); use samples shaped like the model input")
    for i, (d, s) in enumerate(zip(input_shape, x.shape)):
        if i > 0 and isinstance(d, int) and d > 0 and d != s:
            raise UserError(f"{what} {data.path}: 'x' has shape {list(x.shape)} but the model input is "
                            f"{input_shape} (dimension {i} differs)")


# -- evaluation data of the on-board benchmark ----------------------------------------------------


@dataclass
class EvalData:
    path: Path
    arrays: dict[str, np.ndarray]
    task: str
    n: int
    labels: Optional[np.ndarray] = None
    ref: Optional[np.ndarray] = None
    baseline_top1: Optional[float] = None
    baseline_ppl: Optional[float] = None
    input_keys: list[str] = field(default_factory=list)


def _scalar(v: np.ndarray) -> Any:
    a = np.asarray(v)
    return a.item() if a.size == 1 else None


def load_eval_npz(path: str | Path, max_samples: Optional[int] = None) -> EvalData:
    """Read and validate an evaluation ``.npz`` (the keys: module docstring, second table)."""
    p = Path(path)
    arrays = read_npz(p, what="eval data", fix=EVAL_HELP)
    task_arr = arrays.pop("task", None)
    task = str(_scalar(task_arr)) if task_arr is not None else None
    labels = arrays.pop("y", None)
    ref = arrays.pop("ref_logits", None)
    alias = arrays.pop("logits", None)  # save_npz writes the PyTorch outputs as 'logits'
    if ref is None:
        ref = alias
    b_top1 = arrays.pop("baseline_top1", None)
    b_ppl = arrays.pop("baseline_ppl", None)
    if task is None:
        if labels is not None:
            task = "classification"
        elif "input_ids" in arrays or ("x" in arrays and arrays["x"].ndim == 2
                                       and np.issubdtype(arrays["x"].dtype, np.integer)):
            task = "lm"  # token ids (N, T)
    if task not in ("classification", "lm"):
        raise UserError(
            f"{p.name}: cannot tell the task; add labels 'y' (classification), 'input_ids' (language model) "
            "or a 'task' entry ('classification' | 'lm')"
        )
    if not arrays:
        raise UserError(f"{p.name} holds no input arrays: store the inputs as 'x' or under the model's input names")
    ns = {k: a.shape[0] if a.ndim else None for k, a in arrays.items()}
    if any(v is None for v in ns.values()) or len(set(ns.values())) != 1:
        raise UserError(f"{p.name}: input arrays must share their first (sample) axis, got {ns}")
    n = next(iter(ns.values()))
    if labels is not None and labels.shape[0] != n:
        raise UserError(f"{p.name}: 'y' has {labels.shape[0]} labels for {n} samples")
    if ref is not None and ref.shape[0] != n:
        raise UserError(f"{p.name}: 'ref_logits' has {ref.shape[0]} rows for {n} samples")
    if task == "classification" and labels is None:
        raise UserError(f"{p.name}: classification needs integer labels 'y'")
    if max_samples is not None and max_samples < n:
        arrays = {k: a[:max_samples] for k, a in arrays.items()}
        labels = labels[:max_samples] if labels is not None else None
        ref = ref[:max_samples] if ref is not None else None
        n = max_samples
    return EvalData(
        path=p,
        arrays=arrays,
        task=task,
        n=int(n),
        labels=labels,
        ref=ref,
        baseline_top1=float(_scalar(b_top1)) if b_top1 is not None else None,
        baseline_ppl=float(_scalar(b_ppl)) if b_ppl is not None else None,
        input_keys=sorted(arrays),
    )
