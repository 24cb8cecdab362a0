"""TensorRT build planning, pure and testable without TensorRT: the supported versions
(:func:`version_major`), build options (:class:`TrtOptions`) mapped to network/builder flags and the
ONNX variant to build from (:func:`plan_build`, :class:`TrtPlan`), the optimisation-profile shapes
(:func:`profile_shapes`, DLA static), the timing-cache location (:func:`timing_cache_path`) and the
equivalent ``trtexec`` command line (:func:`trtexec_command`).

The engine build itself (TensorRT Python API, INT8 calibrator) is :mod:`benchmarks.board.tensorrt_engine`;
the host graph preparation is :mod:`exporters.tensorrt_compile`. Standard library only: no
TensorRT, no numpy, no torch; Python 3.8 compatible (it ships to the board in the bundle).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmarks.board.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")


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
