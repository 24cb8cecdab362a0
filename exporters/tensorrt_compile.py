"""The TensorRT compile step: prepare the ONNX graph (FP16 / symmetric Q/DQ INT8), check its
operators against the TensorRT ONNX parser, write the ``trtexec`` build script with its shape
profiles, and, where TensorRT is importable and the engine is wanted here, build it.
No torch; Python 3.8 compatible."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import benchmarks.board.tensorrt_engine as te
import benchmarks.board.tensorrt_plan as tp
from exporters import onnx_utils as ou
from exporters import trt_ops
from benchmarks.board.atomic import atomic_write_json
from benchmarks.board.calib import CalibData
from benchmarks.board.errors import UserError
from exporters.ort_backend import quantize_int8
from exporters.stack import CompileRequest, stack_runner

INT8_SCHEMES = ("auto",)


def compile_step(req: CompileRequest) -> tuple:
    section, run = _tensorrt(req.onnx_path, req.out, req.precision, req.io, req.calib, req.calib_samples,
                             req.trt_version, req.trtexec_only, req.trt_options, req.keep_first_last_float, req.say)
    measured_on = None
    if not req.want_runner:
        run = None
    elif req.trtexec_only:  # no engine here: measure the graph TensorRT will build, with ONNX Runtime
        run = stack_runner("onnxruntime", req.out / "model.onnx", "fp32", providers=["CPUExecutionProvider"])
        measured_on = ("onnxruntime CPU on the ONNX prepared for TensorRT (the engine itself is not built "
                       "here; re-measure on the board)")
    return section, run, measured_on


def _tensorrt(onnx_path: Path, tmp: Path, precision: str, io: dict[str, Any], calib: CalibData | None,
              calib_samples: int, trt_version: str | None, trtexec_only: bool, opts: Any,
              keep_first_last_float: bool, say: Callable[[str], None]) -> tuple[dict[str, Any], Any]:

    opts = opts or tp.TrtOptions()
    opts.precision = precision
    trt = None
    if not trtexec_only:
        trt = te.import_tensorrt()  # clear UserError naming what to install
        installed = trt.__version__
        if trt_version and tp.version_major(trt_version) != tp.version_major(installed):
            raise UserError(f"--trt-version {trt_version} differs from the installed TensorRT {installed}")
        trt_version = installed
    trt_version = trt_version or "10.3"
    major = tp.version_major(trt_version)
    src = ou.load_onnx(onnx_path)
    traits = tp.graph_traits(src)
    del src
    if trtexec_only and opts.int8_calibrator and precision == "int8":
        opts.int8_calibrator = False  # the calibrator needs TensorRT: place Q/DQ here instead
    plan = tp.plan_build(opts, major, graph_has_qdq=traits["has_qdq"], graph_is_fp16=traits["is_fp16"])
    prepared = tmp / "model.onnx"
    prep_info: dict[str, Any] = {"variant": plan.onnx_variant}
    if plan.onnx_variant == "fp16" and not traits["is_fp16"]:
        say("convert the ONNX graph to FP16")
        prep_info.update(make_fp16_onnx(onnx_path, prepared))
    elif plan.onnx_variant == "qdq" and not traits["has_qdq"]:
        if calib is None:
            raise UserError("INT8 for TensorRT needs calibration data to place Q/DQ nodes: pass --calib DATA.npz")
        say("insert symmetric INT8 Q/DQ nodes")
        prep_info.update(make_qdq_onnx(onnx_path, prepared, calib, samples=calib_samples,
                                          keep_first_last_float=keep_first_last_float))
    else:
        shutil.copy2(onnx_path, prepared)
    say("check operators against the TensorRT ONNX parser")
    report = trt_ops.check_graph(prepared, trt_version=trt_version)
    atomic_write_json(tmp / "trt_op_check.json", report.to_dict())
    if not report.ok:
        raise UserError(f"the graph will not build with TensorRT {trt_version}: " + "; ".join(report.problems()))
    shapes = tp.profile_shapes(io["inputs"], opts)
    if plan.calibrator:
        opts.calib_cache = opts.calib_cache or "calib.cache"
    # the timing cache lives outside this (fresh) folder, keyed by device and TensorRT version: on the
    # board the script works out its path; a build here uses this machine's
    user_cache = opts.timing_cache
    script_opts = tp.TrtOptions(**{**vars(opts), "timing_cache": user_cache or "@TIMING_CACHE@"})
    cmd = tp.trtexec_command("model.onnx", "model.engine", plan, script_opts, shapes, times_json="times.json")
    (tmp / "trtexec_build.sh").write_text(trtexec_script(cmd, trt_version))
    (tmp / "trtexec_build.sh").chmod(0o755)
    artifacts = [{"path": "model.onnx", "role": f"onnx-for-tensorrt ({plan.onnx_variant})"},
                 {"path": "trt_op_check.json", "role": "tensorrt-operator-check"},
                 {"path": "trtexec_build.sh", "role": "trtexec-command"}]
    section: dict[str, Any] = {
        "backend": {"name": "tensorrt", "version": trt.__version__ if trt else None, "target_version": trt_version},
        "tensorrt": {"plan": plan.to_dict(), "options": {k: v for k, v in vars(opts).items()},
                     "profile_shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()},
                     "trtexec_command": _script_line(cmd), "onnx_preparation": prep_info,
                     "timing_cache": user_cache or "outside the output folder, keyed by device and TensorRT version "
                                                   "($SGLP_EDGE_TRT_CACHE or ~/.cache/sglp-edge/tensorrt)",
                     "op_check": {"ok": report.ok, "table": report.table_version,
                                  "restrictions_to_review": report.restrictions}},
    }
    section["parity_batch"] = tp.max_batch(shapes)
    if trtexec_only:
        section["tensorrt"]["engine_built"] = False
        section["notes"] = [f"engine not built here (no TensorRT): run trtexec_build.sh on the board "
                            f"(TensorRT {trt_version})"]
        return dict(section, artifacts=artifacts), None
    say(f"build the TensorRT {trt.__version__} engine")
    cache = user_cache or str(tp.timing_cache_path(tp.device_key(), trt.__version__))
    cwd_opts = tp.TrtOptions(**{**vars(opts), "timing_cache": cache,
                                "calib_cache": str(tmp / opts.calib_cache) if opts.calib_cache else None})
    info = te.build_engine(prepared, tmp / "model.engine", plan, cwd_opts, shapes, calib=calib)
    section["tensorrt"].update(engine_built=True, build=info)
    artifacts.append({"path": "model.engine", "role": "tensorrt-engine"})
    if opts.calib_cache and (tmp / opts.calib_cache).is_file():
        artifacts.append({"path": opts.calib_cache, "role": "int8-calibration-cache"})
    return dict(section, artifacts=artifacts), stack_runner("tensorrt", tmp / "model.engine", precision,
                                                            max_batch=tp.max_batch(shapes))


_CACHE_PH = "--timingCacheFile=@TIMING_CACHE@"


def _script_line(cmd: Sequence[str]) -> str:
    return tp.command_line(cmd).replace(_CACHE_PH, '"--timingCacheFile=$TIMING_CACHE"')


def trtexec_script(cmd: Sequence[str], trt_version: str) -> str:
    """A bash script that builds and times the engine on the board (``pipefail``: ``| tee`` must not
    hide a failed trtexec; dash has no pipefail). Its timing cache is kept
    outside the folder, keyed by the board's model and TensorRT version (the same file name as
    ``benchmarks.board.tensorrt_plan.timing_cache_path``), so the next build on that board reuses it."""
    return (
        "#!/usr/bin/env bash\n# build + time the engine on the board (run in this folder)\nset -eo pipefail\n"
        f"TRT_VERSION=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo {trt_version})\n"
        "DEVICE=$( (tr -d '\\000' < /proc/device-tree/model) 2>/dev/null || nvidia-smi --query-gpu=name "
        "--format=csv,noheader 2>/dev/null | head -n1 || true)\n"
        "DEVICE=$(printf '%s' \"$DEVICE\" | tr -cs 'A-Za-z0-9.' '-' | tr 'A-Z' 'a-z' | sed 's/^-*//; s/-*$//')\n"
        'CACHE_DIR="${SGLP_EDGE_TRT_CACHE:-$HOME/.cache/sglp-edge/tensorrt}"\nmkdir -p "$CACHE_DIR"\n'
        'TIMING_CACHE="$CACHE_DIR/timing-${DEVICE:-unknown-gpu}-trt$(printf \'%s\' "$TRT_VERSION" | tr -cd \'0-9.\').cache"\n'
        f"{_script_line(cmd)} | tee trtexec.log\n"
    )


# ---------------------------------------------------------------------------------------------
# graph preparation for strongly typed builds (on the host)
# ---------------------------------------------------------------------------------------------
def make_fp16_onnx(src: Path, dst: Path) -> dict[str, Any]:
    """FP32 -> FP16 ONNX graph with FP32 inputs/outputs (ONNX Runtime's float16 converter)."""
    import onnx  # heavy: onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16  # heavy: onnxruntime

    model = convert_float_to_float16(ou.load_onnx(src), keep_io_types=True)
    ou.save_onnx(model, dst)
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "onnx": onnx.__version__}


def make_qdq_onnx(src: Path, dst: Path, calib: CalibData, samples: int = 300,
                  keep_first_last_float: bool = True) -> dict[str, Any]:
    """Symmetric INT8 Q/DQ graph (zero points 0, as TensorRT requires) from calibration data."""
    return quantize_int8(src, dst, calib, samples=samples, symmetric=True, per_channel=True,
                         keep_first_last_float=keep_first_last_float)


def runner(engine_path: str | Path, precision: str = "fp16", max_batch: int = 64) -> Any:
    """``f(x) -> first output`` for a serialized engine, through the board harness's TensorRTRunner
    (benchmarks/board/runner_tensorrt.py: pinned buffers, checked shapes): one runner stack for parity and bench."""
    return stack_runner("tensorrt", engine_path, precision, max_batch=max_batch)
