"""TensorRT engine build through the TensorRT Python API (10.x and 11.x), the equivalent
``trtexec`` command line, and parsers for trtexec's log and ``--exportTimes`` JSON.

TensorRT 10.x (JetPack 6 ships 10.3): weakly typed; FP16 / INT8 are builder flags
(``BuilderFlag.FP16`` / ``BuilderFlag.INT8``). INT8 comes from symmetric Q/DQ nodes placed on the
host (explicit quantization), built NOT strongly typed with the FP16 flag as well, so the layers
without Q/DQ run in FP16 rather than FP32. The implicit ``IInt8EntropyCalibrator2`` (fed from our
``.npz`` calibration data, cache written for reuse) remains for users who ask for it
(``TrtOptions.int8_calibrator``).
TensorRT 11.x: every network is strongly typed (``BuilderFlag.FP16/INT8`` and the calibrator API
were removed): the precision comes from the ONNX graph, so FP16 means an FP16 ONNX graph and INT8
a graph with symmetric Q/DQ nodes (both prepared here on the host, with ONNX Runtime's tools).

Common: workspace limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``), a persistent
timing cache, one optimisation profile for the dynamic axes, DLA core + GPU fallback for Jetson,
and TF32 disabled for FP32 builds (ONNX-vs-TRT FP32 mismatches otherwise, TensorRT #4492).
DLA needs static shapes: a DLA build's profile is min = opt = max (at the optimal batch), and
GPU fallback is explicit (on or off) and reported, with the DLA/GPU layer counts from the build log.
The timing cache lives outside the (fresh) output folder, keyed by device and TensorRT version
(:func:`timing_cache_path`), so every build on that device and version reuses it.

The pure planning part (options -> plan, profile shapes, timing-cache path, the trtexec command)
is :mod:`benchmarks.board.tensorrt_plan`; the trtexec log/JSON parsers are
:mod:`benchmarks.board.trtexec_parse`; the host-side graph preparation (FP16, Q/DQ) is
:mod:`exporters.tensorrt_compile`. Everything here runs on the board (Python 3.8, numpy).

``tensorrt`` (and ``cuda-python`` for device memory) are imported lazily: everything except the
actual build runs without them. Numpy only; no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from benchmarks.board.atomic import atomic_write_bytes
from benchmarks.board.calib import CalibData
from benchmarks.board.errors import UserError
from benchmarks.board.tensorrt_plan import TrtOptions, TrtPlan, version_major
from benchmarks.board.trtexec_parse import parse_dla_layers

INSTALL_HINT = ("the TensorRT Python package is not importable here. On a Jetson install JetPack 6 "
                "(`sudo apt install nvidia-jetpack`, gives TensorRT 10.3 with python3-libnvinfer); on an x86 "
                "GPU host `pip install tensorrt` (needs NVIDIA's index and a CUDA GPU). Or run "
                "`sglp-edge compile ... --backend tensorrt --trtexec-only` to get the ONNX and trtexec "
                "command to build on the board")
CUDA_HINT = "INT8 calibration and parity runs need device memory: pip install cuda-python (or pycuda)"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # heavy: tensorrt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    except Exception as e:  # noqa: BLE001 - e.g. libnvinfer.so missing behind a stub package
        raise UserError(f"importing tensorrt failed ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return trt


# ---------------------------------------------------------------------------------------------
# calibration batching (pure numpy) and the IInt8EntropyCalibrator2 built on it
# ---------------------------------------------------------------------------------------------
class CalibBatcher:
    """Fixed-size float32/int64 batches for a TensorRT calibrator (which needs a constant batch
    size): the last incomplete batch is dropped; ``max_batches`` caps the number handed out."""

    def __init__(self, x: np.ndarray, batch_size: int, max_batches: int | None = None):
        if batch_size < 1:
            raise UserError(f"calibration batch size must be >= 1, got {batch_size}")
        if x.shape[0] < batch_size:
            raise UserError(f"calibration data has {x.shape[0]} samples, fewer than one batch of {batch_size}; "
                            "add samples or lower --calib-batch")
        self.x, self.batch_size = x, batch_size
        n = x.shape[0] // batch_size
        self.n_batches = min(n, max_batches) if max_batches else n
        self.index = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.x.shape[1:])) * self.batch_size * self.x.dtype.itemsize

    def next_batch(self) -> np.ndarray | None:
        if self.index >= self.n_batches:
            return None
        i = self.index * self.batch_size
        self.index += 1
        return np.ascontiguousarray(self.x[i:i + self.batch_size])

    def reset(self) -> None:
        self.index = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        self.reset()
        while (b := self.next_batch()) is not None:
            yield b


class _Cuda:
    """Minimal device memory through cuda-python (``cuda.bindings.runtime`` or ``cuda.cudart``)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.8  # heavy: cuda-python
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python  # heavy: cuda-python
            except ImportError:
                raise UserError(CUDA_HINT) from None
        self.rt = cudart

    def _ok(self, res: Any) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise UserError(f"CUDA call failed with error {err}")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def h2d(self, ptr: int, arr: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def d2h(self, arr: np.ndarray, ptr: int) -> None:
        self._ok(self.rt.cudaMemcpy(arr.ctypes.data, ptr, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def sync(self) -> None:
        self._ok(self.rt.cudaDeviceSynchronize())


def make_calibrator(trt: Any, data: CalibData, batch_size: int, cache_path: str | Path | None,
                    max_batches: int | None = None) -> Any:
    """An ``IInt8EntropyCalibrator2`` fed from ``data`` (TensorRT 10.x only)."""
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise UserError(f"TensorRT {trt.__version__} has no INT8 calibrator API (removed in 11.x); "
                        "INT8 must come from a Q/DQ graph")
    batcher = CalibBatcher(data.x, batch_size, max_batches)
    cuda = _Cuda()

    class NpzEntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batcher, self.cache_path = batcher, Path(cache_path) if cache_path else None
            self.device = cuda.malloc(batcher.nbytes)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            b = self.batcher.next_batch()
            if b is None:
                return None
            cuda.h2d(self.device, b)
            return [self.device]

        def read_calibration_cache(self) -> bytes | None:
            if self.cache_path and self.cache_path.is_file():
                return self.cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if self.cache_path:
                atomic_write_bytes(self.cache_path, bytes(cache))

    return NpzEntropyCalibrator()


# ---------------------------------------------------------------------------------------------
# engine build (needs TensorRT)
# ---------------------------------------------------------------------------------------------
def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps error messages for our one-line errors."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.lines: list[str] = []  # INFO and up: the DLA/GPU layer placement is logged at INFO

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            if severity != trt.ILogger.Severity.VERBOSE and len(self.lines) < 20000:
                self.lines.append(msg)

    return CollectingLogger()


def build_engine(onnx_path: str | Path, engine_path: str | Path, plan: TrtPlan, opts: TrtOptions,
                 shapes: dict[str, tuple[list, list, list]], *, calib: CalibData | None = None) -> dict[str, Any]:
    """Build and serialise an engine with the TensorRT Python API following ``plan``."""
    trt = import_tensorrt()
    major = version_major(trt.__version__)
    if major != plan.major:
        raise UserError(f"the plan was made for TensorRT {plan.major}.x but TensorRT {trt.__version__} is installed")
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    net_flags = 0
    for name in plan.network_flags:
        if hasattr(trt.NetworkDefinitionCreationFlag, name):
            net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name}: {'; '.join(errs)[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if opts.builder_optimization_level is not None:
        config.builder_optimization_level = int(opts.builder_optimization_level)
    profile = None
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if plan.calibrator:
        if calib is None:
            raise UserError("TensorRT 10 INT8 needs calibration data: pass --calib DATA.npz")
        config.int8_calibrator = make_calibrator(trt, calib, opts.calib_batch_size, opts.calib_cache)
        if shapes:
            cprof = builder.create_optimization_profile()
            for name, (_lo, opt, _hi) in shapes.items():
                fixed = [opts.calib_batch_size] + list(opt[1:])
                cprof.set_shape(name, fixed, fixed, fixed)
            config.set_calibration_profile(cprof)
    if plan.dla is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(plan.dla["core"])
    cache = None
    if opts.timing_cache:
        tc = Path(opts.timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT engine build failed: " + ("; ".join(logger.errors)[:400] or "see the TensorRT log"))
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache is not None:
        Path(opts.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(opts.timing_cache, bytes(cache.serialize()))
    info: dict[str, Any] = {"tensorrt": trt.__version__, "engine_bytes": Path(engine_path).stat().st_size,
                            "timing_cache": str(opts.timing_cache) if opts.timing_cache else None,
                            "profile_shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()}}
    if plan.dla is not None:
        placement = parse_dla_layers("\n".join(logger.lines))
        info["dla"] = {**plan.dla, "layers_on_dla": placement["dla"] if placement["found"] else None,
                       "layers_on_gpu": placement["gpu"] if placement["found"] else None,
                       "gpu_layers": placement["gpu_layers"],
                       "note": None if placement["found"] else "the builder logged no DLA/GPU placement"}
    return info
