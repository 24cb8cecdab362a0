"""Backend runners for the on-device benchmark (numpy + the backend's own runtime; no torch).

One class per backend, all with the same small interface (:class:`Runner`):

* ``inputs``            -> list of :class:`TensorSpec` (name, shape at the current batch, dtype)
* ``set_batch(b)``      -> reshape/recompile for batch ``b``; raises :class:`UnsupportedBatch`
* ``bind(feeds)``       -> a no-argument callable running one inference on those inputs
* ``sync()``            -> block until queued device work is done (no-op for CPU runtimes)
* ``infer(feeds)``      -> outputs as numpy arrays (host memory)
* ``info()``            -> what was actually used: runtime version, threads, streams, precision

Backends, one module each (imported only by :func:`open_runner`, or on first use of their runner
class through this module, so a runtime package is imported only when its backend is used):

* ``openvino``    -- :class:`~benchmarks.board.runner_openvino.OpenVINORunner` (``runner_openvino.py``):
  ``openvino.Core().compile_model`` of an IR (``.xml`` + ``.bin``) or ONNX file, with
  ``PERFORMANCE_HINT``, ``INFERENCE_NUM_THREADS``, ``NUM_STREAMS`` and
  ``INFERENCE_PRECISION_HINT`` set explicitly and read back from the compiled model.
* ``onnxruntime`` -- :class:`~benchmarks.board.runner_onnxruntime.OnnxRuntimeRunner` (``runner_onnxruntime.py``):
  ``onnxruntime.InferenceSession`` with ``intra_op_num_threads`` fixed,
  ``inter_op_num_threads = 1``, sequential execution, chosen execution providers (CPU by default;
  XNNPACK/ACL on ARM where the ORT build has them).
* ``tensorrt``    -- :class:`~benchmarks.board.runner_tensorrt.TensorRTRunner` (``runner_tensorrt.py``):
  a serialized engine (``.engine``/``.plan``) run with TensorRT 10/11
  ``execute_async_v3`` on a CUDA stream; device buffers through ``cuda-python``
  (``cuda.bindings.runtime``, or the older ``cuda.cudart``) or ``cupy``, whichever is installed.
  All imports are lazy; a missing package is a :class:`~benchmarks.board.errors.UserError` naming what to
  install. Timed calls include host->device copy, execution and device->host copy ("host
  latency", what an application sees); the stream is synchronised before every clock read.

The runner classes (and the TensorRT module's CUDA helpers) stay importable from here, e.g.
``from benchmarks.board.runners import OpenVINORunner``: a module-level ``__getattr__`` loads them lazily
(an eager import would be an import cycle, the backend modules build on :class:`Runner`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks.board.errors import UserError

from benchmarks.board.backends import NAMES as BACKENDS  # noqa: E402  (one registry of backends)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class UnsupportedBatch(Exception):
    """The artifact cannot run at the requested batch size (static shape / engine profile)."""


@dataclass
class TensorSpec:
    name: str
    shape: list[Optional[int]]  # None = dynamic, still to be resolved
    dtype: str  # numpy dtype name

    def is_static(self) -> bool:
        return all(isinstance(d, int) and d >= 0 for d in self.shape)


def parse_shape(text: str) -> list[int]:
    """``1x3x32x32`` or ``1,3,32,32`` or ``[1,3,32,32]`` -> [1, 3, 32, 32]."""
    t = text.strip().strip("[]()")
    parts = [p for p in t.replace("x", ",").replace("X", ",").split(",") if p.strip()]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"bad shape {text!r}: use integers separated by 'x' or ',', e.g. 1x3x32x32") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"bad shape {text!r}: every dimension must be a positive integer")
    return dims


def artifact_files(path: str | os.PathLike, backend: str) -> list[Path]:
    """Files that make up the artifact (for model size and for bundling)."""
    p = Path(path)
    files = [p]
    if p.suffix.lower() == ".xml":
        b = p.with_suffix(".bin")
        if b.exists():
            files.append(b)
    elif p.suffix.lower() == ".onnx":
        for cand in (p.with_name(p.name + ".data"), p.with_suffix(".data"), p.with_name(p.name + "_data"),
                     p.with_suffix(".onnx.data")):
            if cand.exists() and cand not in files:
                files.append(cand)
    return files


def artifact_size_bytes(path: str | os.PathLike, backend: str) -> int:
    return sum(f.stat().st_size for f in artifact_files(path, backend))


def random_feeds(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic inputs for latency runs: N(0,1) floats, zeros for integer inputs (token ids,
    masks are then all-valid ones)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        if not s.is_static():
            raise UserError(
                f"input {s.name!r} has a dynamic shape {s.shape}: give it with --input-shape "
                f"{s.name}=1x... (or `inputs:` in the device profile)"
            )
        dt = np.dtype(s.dtype)
        if np.issubdtype(dt, np.floating):
            feeds[s.name] = rng.standard_normal(s.shape).astype(dt)
        elif "mask" in s.name.lower():
            feeds[s.name] = np.ones(s.shape, dtype=dt)
        else:
            feeds[s.name] = np.zeros(s.shape, dtype=dt)
    return feeds


class Runner:
    backend = "base"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.output_names: list[str] = []
        self.batch: Optional[int] = None

    def _common(self, artifact: str | os.PathLike, threads: Optional[int], streams: int, precision: str) -> None:
        """Checks and settings every backend shares: the artifact exists, the precision is known."""
        self.path = Path(artifact)
        if not self.path.exists():
            raise UserError(f"artifact not found: {self.path}")
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.threads, self.streams, self.precision = threads, streams, precision

    # -- interface -----------------------------------------------------------------------------
    def set_batch(self, batch: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:  # pragma: no cover
        raise NotImplementedError

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def sync(self) -> None:
        return None

    def info(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        return None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------
    def _resolve(self, declared: list[TensorSpec], overrides: dict[str, list[int]] | None) -> list[TensorSpec]:
        overrides = dict(overrides or {})
        out = []
        for spec in declared:
            shape = list(spec.shape)
            given = None
            if spec.name in overrides:
                given = shape = list(overrides.pop(spec.name))
            elif len(declared) == 1 and "" in overrides:
                given = shape = list(overrides.pop(""))
            if spec.shape and given is not None:
                if len(shape) != len(spec.shape):
                    raise UserError(
                        f"input {spec.name!r} has rank {len(spec.shape)} {spec.shape} but the given shape is {shape}"
                    )
                for i, (want, got) in enumerate(zip(spec.shape, shape)):
                    if i > 0 and isinstance(want, int) and want != got:
                        raise UserError(
                            f"input {spec.name!r} is fixed at {spec.shape} in the model but the profile/--input-shape "
                            f"says {shape}; fix the profile's inputs"
                        )
            out.append(TensorSpec(spec.name, shape, spec.dtype))
        extra = [k for k in overrides if k]
        if extra:
            raise UserError(
                f"--input-shape names unknown input(s) {extra}; the model's inputs are {[s.name for s in declared]}"
            )
        return out

    def _with_batch(self, specs: list[TensorSpec], batch: int) -> list[TensorSpec]:
        out = []
        for s in specs:
            shape = list(s.shape)
            if shape:
                shape[0] = batch
            out.append(TensorSpec(s.name, shape, s.dtype))
        return out

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        names = {s.name for s in self.inputs}
        missing = names - set(feeds)
        if missing:
            raise UserError(f"missing input(s) {sorted(missing)} (the model's inputs are {sorted(names)})")



# ============================================================================================


def guess_backend(path: str | os.PathLike) -> str:
    s = Path(path).suffix.lower()
    if s == ".xml":
        return "openvino"
    if s in (".engine", ".plan", ".trt"):
        return "tensorrt"
    if s in (".onnx", ".ort"):
        return "onnxruntime"
    raise UserError(f"cannot tell the backend from {Path(path).name!r}: pass --backend openvino|onnxruntime|tensorrt")


def open_runner(
    backend: str,
    artifact: str | os.PathLike,
    *,
    threads: Optional[int] = None,
    streams: int = 1,
    precision: str = "fp32",
    device: str = "CPU",
    providers: Sequence[str] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    trt_timing: str = "host",
) -> Runner:
    """Open ``artifact`` with ``backend``; every problem the user can fix is a UserError."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    if streams < 1:
        raise UserError(f"streams must be >= 1, got {streams}")
    if backend == "openvino":
        from benchmarks.board.runner_openvino import OpenVINORunner

        return OpenVINORunner(artifact, threads=threads, streams=streams, precision=precision, device=device,
                              input_shapes=input_shapes)
    if backend == "onnxruntime":
        from benchmarks.board.runner_onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(artifact, threads=threads, streams=streams, precision=precision,
                                 providers=providers, input_shapes=input_shapes)
    from benchmarks.board.runner_tensorrt import TensorRTRunner

    return TensorRTRunner(artifact, threads=threads, streams=streams, precision=precision,
                          input_shapes=input_shapes, timing=trt_timing)


# names that moved to the backend modules, still importable from here (loaded on first use)
_LAZY = {
    "OpenVINORunner": "benchmarks.board.runner_openvino",
    "_OV_PRECISION": "benchmarks.board.runner_openvino",
    "_port_name": "benchmarks.board.runner_openvino",
    "OnnxRuntimeRunner": "benchmarks.board.runner_onnxruntime",
    "_ORT_TYPES": "benchmarks.board.runner_onnxruntime",
    "TensorRTRunner": "benchmarks.board.runner_tensorrt",
    "_CudaPython": "benchmarks.board.runner_tensorrt",
    "_CuPy": "benchmarks.board.runner_tensorrt",
    "_wrap_host": "benchmarks.board.runner_tensorrt",
    "_cuda_backend": "benchmarks.board.runner_tensorrt",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
