"""Calibration / evaluation data as ``.npz`` (numpy only: runs on the board too).

The torch side writes, the exporters read. An ``.npz`` holds:

* ``x``       - float32 NCHW images, or int64 token ids ``(N, T)``  (required)
* ``y``       - int64 labels ``(N,)``                                  (optional)
* ``logits``  - float32 reference outputs of the PyTorch model for ``x`` (optional; when present,
                backend parity is measured against PyTorch itself rather than ONNX Runtime FP32)

Anything wrong with the file is a :class:`UserError` that names the fix.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks.board.atomic import atomic_write_bytes, sha256_file
from benchmarks.board.errors import UserError

NPZ_HELP = ("an .npz with array 'x' (float32 NCHW images or int64 token ids), optional 'y' (labels) "
            "and optional 'logits' (PyTorch reference outputs)")


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
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give {NPZ_HELP}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{what} file {path} is not a readable .npz ({type(e).__name__}: {e}); "
                        f"re-create it with numpy.savez as {NPZ_HELP}") from None
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
