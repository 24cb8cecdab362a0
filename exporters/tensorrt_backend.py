"""TensorRT backend: engine build through the TensorRT Python API (10.x and 11.x), the equivalent
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
    int8_calibrator: bool = False  # TensorRT 10: implicit INT8 with IInt8EntropyCalibrator2 instead of Q/DQ


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
        elif opts.int8_calibrator and not graph_has_qdq:  # asked for: implicit INT8, calibrated on the board
            p.set_flags.append("INT8")
            if opts.int8_fp16_fallback:
                p.set_flags.append("FP16")
            p.calibrator = "IInt8EntropyCalibrator2"
            p.notes.append("implicit INT8 with the entropy calibrator (deprecated in TensorRT 10, removed in 11)")
        else:  # explicit quantization, weakly typed: Q/DQ layers INT8, the rest may use FP16
            p.onnx_variant = "qdq"
            p.set_flags.append("INT8")
            if opts.int8_fp16_fallback:
                p.set_flags.append("FP16")
            p.notes.append("INT8 from symmetric Q/DQ nodes, built weakly typed with FP16 fallback (not strongly "
                           "typed: a strongly typed build would run every layer without Q/DQ in FP32)")
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
        p.dla = {"core": opts.dla_core, "gpu_fallback": opts.gpu_fallback, "static_batch": opts.opt_batch}
        if opts.gpu_fallback:
            p.set_flags.append("GPU_FALLBACK")
            p.notes.append(f"DLA core {opts.dla_core} with GPU fallback ON: layers the DLA cannot run go to the GPU "
                           "(counted from the build log in the build report)")
        else:
            p.notes.append(f"DLA core {opts.dla_core} with GPU fallback OFF: the build fails if a layer cannot run "
                           "on the DLA")
        p.notes.append(f"DLA needs static shapes: profile min = opt = max = batch {opts.opt_batch}")
    return p


def graph_traits(model: Any) -> dict[str, bool]:
    """Whether an ONNX ``ModelProto`` holds Q/DQ nodes and whether its float inputs/weights are FP16."""
    ops = {n.op_type for n in model.graph.node}
    fp16 = any(i.data_type == 10 for i in model.graph.initializer)  # TensorProto.FLOAT16
    return {"has_qdq": bool({"QuantizeLinear", "DequantizeLinear"} & ops), "is_fp16": fp16}


def profile_shapes(inputs: Sequence[dict[str, Any]], opts: TrtOptions) -> dict[str, tuple[list, list, list]]:
    """min/opt/max shapes for every input with dynamic dims (batch at 0, sequence at 1 for tokens).
    A DLA build (``opts.dla_core`` set) gets a static profile: min = opt = max = the optimal shape."""
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
        if opts.dla_core is not None:  # DLA: static shapes only, or the engine silently runs on the GPU
            lo, hi = list(opt), list(opt)
        shapes[inp["name"]] = (lo, opt, hi)
    return shapes


def max_batch(shapes: dict[str, tuple[list, list, list]] | None, default: int = 64) -> int:
    """The largest batch every input's profile accepts (parity and calibration batches stay within it)."""
    if not shapes:
        return default
    return max(1, min(min(hi[0] for _lo, _opt, hi in shapes.values()), default))


def check_set_input_shape(context: Any, name: str, shape: Sequence[int]) -> None:
    """``IExecutionContext.set_input_shape`` returns False (and logs) for a shape outside the profile:
    never ignore it, or the engine runs on stale shapes."""
    if not context.set_input_shape(name, tuple(int(d) for d in shape)):
        raise UserError(f"TensorRT refused input shape {list(shape)} for {name!r}: it is outside the engine's "
                        "optimisation profile (rebuild with a larger --max-batch, or run smaller batches)")


def device_key() -> str:
    """A name for this device's GPU (Jetson model from the device tree, else nvidia-smi's name)."""
    import subprocess

    name = ""
    try:
        name = Path("/proc/device-tree/model").read_bytes().decode(errors="replace").strip("\x00 \n")
    except OSError:
        pass
    if not name:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        except (OSError, subprocess.SubprocessError):
            name = ""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower() or "unknown-gpu"


def timing_cache_path(device: str, trt_version: str, root: str | Path | None = None) -> Path:
    """Where the timing cache for ``device`` and ``trt_version`` lives: outside any output folder
    (``$SGLP_EDGE_TRT_CACHE`` or ``~/.cache/sglp-edge/tensorrt``), so every build reuses it."""
    import os

    base = Path(root or os.environ.get("SGLP_EDGE_TRT_CACHE") or Path.home() / ".cache" / "sglp-edge" / "tensorrt")
    dev = re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-").lower() or "unknown-gpu"
    ver = re.sub(r"[^0-9.]+", "", str(trt_version)) or "unknown"
    return base.expanduser() / f"timing-{dev}-trt{ver}.cache"


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
            if plan.calibrator and opts.calib_cache:
                cmd.append(f"--calib={opts.calib_cache}")
    if plan.dla is not None:
        cmd.append(f"--useDLACore={plan.dla['core']}")
        if plan.dla["gpu_fallback"]:
            cmd.append("--allowGPUFallback")
        cmd.append("--verbose")  # the build log then lists the layers running on the DLA and on the GPU
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


def runner(engine_path: str | Path, precision: str = "fp16", max_batch: int = 64) -> Any:
    """``f(x) -> first output`` for a serialized engine, through the board harness's TensorRTRunner
    (benchmarks/runner_tensorrt.py: pinned buffers, checked shapes): one runner stack for parity and bench."""
    from .stack import stack_runner

    return stack_runner("tensorrt", engine_path, precision, max_batch=max_batch)


from .trtexec_parse import (parse_dla_layers, parse_export_times, parse_trtexec_log,  # noqa: E402,F401
                            trtexec_percentile)
