"""TensorRT backend: engine build through the TensorRT Python API (10.x and 11.x), the equivalent
``trtexec`` command line, and parsers for trtexec's log and ``--exportTimes`` JSON.

TensorRT 10.x (JetPack 6 ships 10.3): weakly typed by default; FP16 / INT8 are builder flags
(``BuilderFlag.FP16`` / ``BuilderFlag.INT8``) and implicit INT8 is calibrated by an
``IInt8EntropyCalibrator2`` fed from our ``.npz`` calibration data (cache written for reuse);
a graph that already holds Q/DQ nodes is built strongly typed.
TensorRT 11.x: every network is strongly typed (``BuilderFlag.FP16/INT8`` and the calibrator API
were removed): the precision comes from the ONNX graph, so FP16 means an FP16 ONNX graph and INT8
a graph with symmetric Q/DQ nodes (both prepared here on the host, with ONNX Runtime's tools).

Common: workspace limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``), a persistent
timing cache, one optimisation profile for the dynamic axes, DLA core + GPU fallback for Jetson,
and TF32 disabled for FP32 builds (ONNX-vs-TRT FP32 mismatches otherwise, TensorRT #4492).

``tensorrt`` (and ``cuda-python`` for device memory) are imported lazily: everything except the
actual build runs without them. Numpy only; no torch.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .calib import CalibData
from .errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("the TensorRT Python package is not importable here. On a Jetson install JetPack 6 "
                "(`sudo apt install nvidia-jetpack`, gives TensorRT 10.3 with python3-libnvinfer); on an x86 "
                "GPU host `pip install tensorrt` (needs NVIDIA's index and a CUDA GPU). Or run "
                "`sglp-edge compile ... --backend tensorrt --trtexec-only` to get the ONNX and trtexec "
                "command to build on the board")
CUDA_HINT = "INT8 calibration and parity runs need device memory: pip install cuda-python (or pycuda)"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    except Exception as e:  # noqa: BLE001 - e.g. libnvinfer.so missing behind a stub package
        raise UserError(f"importing tensorrt failed ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return trt


def version_major(version: str | int) -> int:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise UserError(f"TensorRT version {version!r} is not of the form MAJOR[.MINOR] (e.g. 10.3 or 11)") from None
    if major not in (10, 11):
        raise UserError(f"TensorRT {version} is not supported; sglp-edge targets TensorRT 10.x (JetPack 6) and 11.x")
    return major


# ---------------------------------------------------------------------------------------------
# build options -> plan (pure; tested without TensorRT)
# ---------------------------------------------------------------------------------------------
@dataclass
class TrtOptions:
    precision: str = "fp16"
    workspace_mb: int = 1024
    timing_cache: str | None = None  # path; read if present, written after the build
    dla_core: int | None = None  # Jetson DLA core (0/1); None = GPU
    gpu_fallback: bool = True  # let layers DLA cannot run fall back to the GPU
    int8_fp16_fallback: bool = True  # TensorRT 10 implicit INT8: also allow FP16 for unquantised layers
    calib_batch_size: int = 8
    calib_cache: str | None = None
    opt_batch: int = 1
    max_batch: int = 32
    opt_seq: int = 128
    max_seq: int = 512
    builder_optimization_level: int | None = None


@dataclass
class TrtPlan:
    major: int
    precision: str
    network_flags: list[str] = field(default_factory=list)  # NetworkDefinitionCreationFlag names
    set_flags: list[str] = field(default_factory=list)  # BuilderFlag names to set
    clear_flags: list[str] = field(default_factory=list)  # BuilderFlag names to clear
    calibrator: str | None = None  # "IInt8EntropyCalibrator2" when implicit INT8 calibration is used
    onnx_variant: str = "source"  # "source" | "fp16" (FP16 ONNX graph) | "qdq" (symmetric Q/DQ INT8 graph)
    dla: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_build(opts: TrtOptions, major: int, *, graph_has_qdq: bool = False, graph_is_fp16: bool = False) -> TrtPlan:
    """Map (precision, TensorRT major version, what the graph holds) to network/builder flags."""
    if opts.precision not in PRECISIONS:
        raise UserError(f"tensorrt backend supports precisions {', '.join(PRECISIONS)}; got {opts.precision!r}")
    if major not in (10, 11):
        raise UserError(f"TensorRT {major}.x is not supported; use 10.x (JetPack 6) or 11.x")
    if opts.workspace_mb < 1:
        raise UserError("--workspace-mb must be at least 1")
    p = TrtPlan(major=major, precision=opts.precision)
    prec = opts.precision
    if major == 10:
        if prec == "fp32":
            p.clear_flags.append("TF32")
        elif prec == "fp16":
            p.set_flags.append("FP16")
        elif graph_has_qdq:  # explicit quantization: types come from the Q/DQ graph
            p.network_flags.append("STRONGLY_TYPED")
            p.onnx_variant = "qdq"
            p.notes.append("graph holds Q/DQ nodes: built strongly typed (explicit quantization)")
        else:
            p.set_flags.append("INT8")
            if opts.int8_fp16_fallback:
                p.set_flags.append("FP16")
            p.calibrator = "IInt8EntropyCalibrator2"
    else:
        p.network_flags.append("STRONGLY_TYPED")  # always on in 11.x; the flag is set when it still exists
        if prec == "fp32":
            p.clear_flags.append("TF32")
        elif prec == "fp16":
            p.onnx_variant = "source" if graph_is_fp16 else "fp16"
            p.notes.append("TensorRT 11 has no FP16 builder flag: the ONNX graph itself is FP16")
        else:
            p.onnx_variant = "qdq"
            p.notes.append("TensorRT 11 has no INT8 flag or calibrator: INT8 comes from symmetric Q/DQ nodes")
    if opts.dla_core is not None:
        if opts.dla_core < 0:
            raise UserError("--dla-core must be 0 or 1 (the DLA engine index)")
        if prec == "fp32":
            raise UserError("DLA runs FP16 or INT8 only; use --precision fp16 or int8 with --dla-core")
        p.dla = {"core": opts.dla_core, "gpu_fallback": opts.gpu_fallback}
        if opts.gpu_fallback:
            p.set_flags.append("GPU_FALLBACK")
    return p


def graph_traits(model: Any) -> dict[str, bool]:
    """Whether an ONNX ``ModelProto`` holds Q/DQ nodes and whether its float inputs/weights are FP16."""
    ops = {n.op_type for n in model.graph.node}
    fp16 = any(i.data_type == 10 for i in model.graph.initializer)  # TensorProto.FLOAT16
    return {"has_qdq": bool({"QuantizeLinear", "DequantizeLinear"} & ops), "is_fp16": fp16}


def profile_shapes(inputs: Sequence[dict[str, Any]], opts: TrtOptions) -> dict[str, tuple[list, list, list]]:
    """min/opt/max shapes for every input with dynamic dims (batch at 0, sequence at 1 for tokens)."""
    shapes = {}
    for inp in inputs:
        dims = inp["shape"]
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue
        lo, opt, hi = [], [], []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                lo.append(d), opt.append(d), hi.append(d)
            elif i == 0:
                lo.append(1), opt.append(opts.opt_batch), hi.append(opts.max_batch)
            elif i == 1 and inp["dtype"].startswith("int"):
                lo.append(1), opt.append(opts.opt_seq), hi.append(opts.max_seq)
            else:
                raise UserError(f"input {inp['name']} has a dynamic dimension {i} ({d}) that sglp-edge cannot size; "
                                "re-export with a fixed size for it")
        if not (lo[0] <= opt[0] <= hi[0]):
            raise UserError(f"batch sizes must satisfy 1 <= opt ({opt[0]}) <= max ({hi[0]})")
        shapes[inp["name"]] = (lo, opt, hi)
    return shapes


def _shape_spec(shapes: dict[str, tuple[list, list, list]], which: int) -> str:
    return ",".join(f"{name}:" + "x".join(str(d) for d in s[which]) for name, s in shapes.items())


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, plan: TrtPlan, opts: TrtOptions,
                    shapes: dict[str, tuple[list, list, list]] | None = None, *, times_json: str | None = None) -> list[str]:
    """The trtexec command line that builds the same engine as :func:`build_engine` (and times it)."""
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--memPoolSize=workspace:{int(opts.workspace_mb)}M"]
    if opts.timing_cache:
        cmd.append(f"--timingCacheFile={opts.timing_cache}")
    for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if shapes:
            cmd.append(f"{flag}={_shape_spec(shapes, which)}")
    if "TF32" in plan.clear_flags:
        cmd.append("--noTF32")
    if plan.major == 10:
        if "STRONGLY_TYPED" in plan.network_flags:
            cmd.append("--stronglyTyped")
        if "FP16" in plan.set_flags:
            cmd.append("--fp16")
        if "INT8" in plan.set_flags:
            cmd.append("--int8")
            if opts.calib_cache:
                cmd.append(f"--calib={opts.calib_cache}")
    if plan.dla is not None:
        cmd.append(f"--useDLACore={plan.dla['core']}")
        if plan.dla["gpu_fallback"]:
            cmd.append("--allowGPUFallback")
    if opts.builder_optimization_level is not None:
        cmd.append(f"--builderOptimizationLevel={opts.builder_optimization_level}")
    if times_json:
        cmd += ["--warmUp=200", "--duration=3", "--iterations=10", "--percentile=50,90,95,99",
                f"--exportTimes={times_json}"]
    return cmd


def command_line(cmd: Sequence[str]) -> str:
    return shlex.join(list(cmd))


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
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
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
# host-side graph preparation for strongly typed builds
# ---------------------------------------------------------------------------------------------
def make_fp16_onnx(src: Path, dst: Path) -> dict[str, Any]:
    """FP32 -> FP16 ONNX graph with FP32 inputs/outputs (ONNX Runtime's float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from . import onnx_utils as ou

    model = convert_float_to_float16(ou.load_onnx(src), keep_io_types=True)
    ou.save_onnx(model, dst)
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "onnx": onnx.__version__}


def make_qdq_onnx(src: Path, dst: Path, calib: CalibData, samples: int = 300,
                  keep_first_last_float: bool = True) -> dict[str, Any]:
    """Symmetric INT8 Q/DQ graph (zero points 0, as TensorRT requires) from calibration data."""
    from .ort_backend import quantize_int8

    return quantize_int8(src, dst, calib, samples=samples, symmetric=True, per_channel=True,
                         keep_first_last_float=keep_first_last_float)


# ---------------------------------------------------------------------------------------------
# engine build and run (need TensorRT)
# ---------------------------------------------------------------------------------------------
def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps error messages for our one-line errors."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

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
        atomic_write_bytes(opts.timing_cache, bytes(cache.serialize()))
    return {"tensorrt": trt.__version__, "engine_bytes": Path(engine_path).stat().st_size}


def runner(engine_path: str | Path) -> Any:
    """``f(x) -> first output`` for a serialized engine (single input)."""
    trt = import_tensorrt()
    cuda = _Cuda()
    logger = _make_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not load {engine_path}: " + "; ".join(logger.errors)[:300])
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(x: np.ndarray) -> np.ndarray:
        ptrs = []
        try:
            x = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(ins[0])))
            ctx.set_input_shape(ins[0], x.shape)
            dx = cuda.malloc(x.nbytes)
            ptrs.append(dx)
            cuda.h2d(dx, x)
            ctx.set_tensor_address(ins[0], dx)
            results = {}
            for o in outs:
                arr = np.empty(tuple(ctx.get_tensor_shape(o)), dtype=trt.nptype(engine.get_tensor_dtype(o)))
                d = cuda.malloc(max(arr.nbytes, 1))
                ptrs.append(d)
                ctx.set_tensor_address(o, d)
                results[o] = (arr, d)
            if not ctx.execute_async_v3(0):
                raise UserError("TensorRT inference failed")
            cuda.sync()
            arr, d = results[outs[0]]
            cuda.d2h(arr, d)
            return arr.astype(np.float32)
        finally:
            for p in ptrs:
                cuda.free(p)

    return run


# ---------------------------------------------------------------------------------------------
# trtexec output parsers
# ---------------------------------------------------------------------------------------------
_METRICS = {"Latency": "latency", "End-to-End Host Latency": "end_to_end", "Enqueue Time": "enqueue",
            "H2D Latency": "h2d", "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}
_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_LINE = re.compile(r"^(?:\[[^\]]*\]\s*)*\[(?P<sev>[IWEVF])\]\s?(?P<msg>.*)$")


def _pkey(p: Any) -> str:
    return format(float(p), "g")


def _trt_version_from_tag(tag: str) -> str:
    n = int(tag)
    if n >= 10000:  # 10.x and later: v100300 = 10.3.0
        return f"{n // 10000}.{(n // 100) % 100}.{n % 100}"
    return f"{n // 1000}.{(n // 100) % 10}.{n % 100}"  # 8.x: v8601 = 8.6.1


def parse_trtexec_log(text: str) -> dict[str, Any]:
    """Figures from trtexec's console output (TensorRT 8.4 .. 10.x format).

    Returns the status (PASSED / FAILED / incomplete), the command, TensorRT version, build options
    (precision), device, throughput, per-metric min/max/mean/median/percentiles in ms, totals,
    warm-up and trace counts, engine build time / size, and the warning / error lines."""
    res: dict[str, Any] = {"status": "incomplete", "metrics": {}, "warnings": [], "errors": []}
    m = re.search(r"&&&& RUNNING TensorRT\.trtexec \[TensorRT v(\d+)\](?: \[[^\]]*\])? # (.*)", text)
    if m:
        res["trt_version"] = _trt_version_from_tag(m.group(1))
        res["command"] = m.group(2).strip()
    if re.search(r"^&&&& PASSED", text, re.M):
        res["status"] = "passed"
    elif re.search(r"^&&&& FAILED", text, re.M):
        res["status"] = "failed"
    simple = {
        "trt_version": (r"TensorRT version: ([\d.]+)", str),
        "precision": (r"\[I\] Precision: (\S+)", str),
        "device": (r"Selected Device: (.+)", str),
        "compute_capability": (r"Compute Capability: ([\d.]+)", str),
        "throughput_qps": (r"Throughput: " + _NUM + " qps", float),
        "total_host_walltime_s": (r"Total Host Walltime: " + _NUM + " s", float),
        "total_gpu_compute_s": (r"Total GPU Compute Time: " + _NUM + " s", float),
        "engine_build_s": (r"Engine built in " + _NUM + " sec", float),
        "engine_size_mib": (r"Created engine with size: " + _NUM + " MiB", float),
        "dla_core": (r"\[I\] DLACore: (\d+)", int),
    }
    for key, (pat, typ) in simple.items():
        mm = re.search(pat, text)
        if mm:
            res[key] = typ(mm.group(1).strip())
    mm = re.search(r"Warmup completed (\d+) queries over " + _NUM + " ms", text)
    if mm:
        res["warmup_queries"], res["warmup_ms"] = int(mm.group(1)), float(mm.group(2))
    mm = re.search(r"Timing trace has (\d+) queries over " + _NUM + " s", text)
    if mm:
        res["timed_queries"], res["timed_s"] = int(mm.group(1)), float(mm.group(2))
    for label, key in _METRICS.items():
        mm = re.search(r"\] " + re.escape(label) + r": (min = .*)$", text, re.M)
        if not mm:
            continue
        line = mm.group(1)
        stats: dict[str, Any] = {}
        for stat in ("min", "max", "mean", "median"):
            s = re.search(rf"\b{stat} = {_NUM} ms", line)
            if s:
                stats[stat] = float(s.group(1))
        pct = {_pkey(p): float(v)
               for p, v in re.findall(r"percentile\((\d+(?:\.\d+)?)%\) = " + _NUM + " ms", line)}
        if pct:
            stats["percentiles"] = pct
        res["metrics"][key] = stats
    for line in text.splitlines():
        lm = _LINE.match(line.strip())
        if lm and lm.group("sev") == "W":
            res["warnings"].append(lm.group("msg").strip())
        elif lm and lm.group("sev") in ("E", "F"):
            res["errors"].append(lm.group("msg").strip())
    if res["status"] == "incomplete" and "command" not in res and not res["metrics"]:
        raise UserError("this does not look like trtexec output (no '&&&& RUNNING TensorRT.trtexec' header "
                        "and no performance summary)")
    return res


def trtexec_percentile(sorted_values: np.ndarray, percentile: float) -> float:
    """trtexec's own percentile rule (samples/common/sampleReporting.cpp: findPercentile)."""
    n = len(sorted_values)
    if n == 0:
        return math.inf
    f32 = np.float32  # the C++ computes in float: (1 - percentile / 100) * all
    exclude = int((f32(1) - f32(percentile) / f32(100)) * f32(n))
    return float(sorted_values[max(n - 1 - exclude, 0)])


_TIME_KEYS = {  # current (TensorRT 10) name, pre-10 name
    "h2d": ("h2dMs", "inMs"), "compute": ("computeMs", "computeMs"), "d2h": ("d2hMs", "outMs"),
    "latency": ("latencyMs", "latencyMs"), "end_to_end": ("endToEndMs", "endToEndMs"),
}


def parse_export_times(path_or_text: str | Path, *, warmup_ms: float | None = None,
                       percentiles: Sequence[float] = (50, 90, 95, 99)) -> dict[str, Any]:
    """Per-iteration times from ``trtexec --exportTimes=FILE`` (list of objects with startEnqMs,
    endEnqMs, startH2dMs, ..., h2dMs, computeMs, d2hMs, latencyMs, endToEndMs; pre-10 files use
    startInMs/inMs/outMs). ``warmup_ms`` drops iterations whose compute started earlier, as trtexec's
    own summary does. Returns raw per-iteration arrays and summary statistics in ms."""
    text = str(path_or_text)
    p = Path(text) if len(text) < 4096 and "\n" not in text else None
    if p is not None and p.is_file():
        text = p.read_text()
    elif p is not None and not text.lstrip().startswith("["):
        raise UserError(f"trtexec times file {p} does not exist")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"trtexec --exportTimes output is not valid JSON ({e.msg} at line {e.lineno}); "
                        "was the run interrupted?") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError("trtexec --exportTimes output must be a non-empty JSON list of per-iteration objects")
    if warmup_ms is not None:
        start_key = "startComputeMs"
        rows = [r for r in rows if float(r.get(start_key, 0.0)) >= warmup_ms]
        if not rows:
            raise UserError(f"no iterations left after dropping the first {warmup_ms} ms of warm-up")
    series: dict[str, np.ndarray] = {}
    for key, names in _TIME_KEYS.items():
        vals = [next((r[n] for n in names if n in r), None) for r in rows]
        if all(v is not None for v in vals):
            series[key] = np.asarray(vals, dtype=np.float64)
    if "startEnqMs" in rows[0] and "endEnqMs" in rows[0]:
        series["enqueue"] = np.asarray([r["endEnqMs"] - r["startEnqMs"] for r in rows], dtype=np.float64)
    if "compute" not in series and "latency" not in series:
        raise UserError("trtexec --exportTimes rows hold neither computeMs nor latencyMs")
    stats = {}
    for key, arr in series.items():
        s = np.sort(arr)
        stats[key] = {"min": float(s[0]), "max": float(s[-1]), "mean": float(s.mean()), "std": float(s.std()),
                      "median": float(np.median(s)),
                      "percentiles": {_pkey(p): trtexec_percentile(s, p) for p in percentiles}}
    out: dict[str, Any] = {"iterations": len(rows), "stats_ms": stats,
                           "per_iteration_ms": {k: v.tolist() for k, v in series.items()}}
    first = next((rows[0].get(k) for k in ("startH2dMs", "startInMs") if k in rows[0]), None)
    last = next((rows[-1].get(k) for k in ("endD2hMs", "endOutMs") if k in rows[-1]), None)
    if first is not None and last is not None and last > first:
        out["walltime_s"] = (last - first) / 1000.0
        out["throughput_qps"] = len(rows) / out["walltime_s"]
    return out
