"""Compile an ONNX file for one backend and precision; write every artifact plus ``manifest.json``
atomically into one output folder (nothing half-written is ever left behind).

    compile_model("model.onnx", "openvino", "int8", "out/ov_int8", calib="calib.npz", eval_data="eval.npz")

The manifest records the source (path, SHA-256, opset, the export's own parity against PyTorch),
the backend and its version, the requested precision and the precision the runtime really uses,
every artifact with its SHA-256, the calibration data used, and parity figures of the compiled
artifact on evaluation inputs: against the PyTorch reference logits when the evaluation ``.npz``
carries them (``logits``), otherwise against ONNX Runtime FP32 on the source ONNX.
No torch: runs on the board too.
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import onnx_utils as ou
from .atomic import atomic_dir, atomic_write_json, sha256_file
from .calib import CalibData, batches, check_matches_input, load_npz
from .errors import UserError

MANIFEST_FORMAT = "sglp-edge/compile-manifest/1"
MANIFEST_NAME = "manifest.json"
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "openvino": ("fp32", "fp16", "int8"),
    "onnxruntime": ("fp32", "int8"),
    "tensorrt": ("fp32", "fp16", "int8"),
}


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglp-edge")
    except Exception:  # noqa: BLE001
        return "unknown"


def _host() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "python": platform.python_version()}


def check_request(backend: str, precision: str) -> None:
    if backend not in BACKEND_PRECISIONS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_PRECISIONS)}")
    if precision not in BACKEND_PRECISIONS[backend]:
        raise UserError(f"precision {precision} is not supported by the {backend} backend; "
                        f"choose one of {', '.join(BACKEND_PRECISIONS[backend])}")


def _as_data(data: str | Path | CalibData | None, what: str, require_labels: bool = False) -> CalibData | None:
    if data is None or isinstance(data, CalibData):
        return data
    return load_npz(data, what=what, require_labels=require_labels)


def _ort_reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    from .ort_backend import runner

    return runner(onnx_path.parent, ["CPUExecutionProvider"], artifact=onnx_path.name)(x)


def _run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([fn(b) for b in batches(x, batch)], 0)


class _Steps:
    """Rich progress: one spinner line whose text follows the backend's steps."""

    def __init__(self, enabled: bool, title: str):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                                 disable=not enabled, transient=False)
        self.title = title

    def __enter__(self) -> "_Steps":
        self.progress.__enter__()
        self.task = self.progress.add_task(self.title, total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.update(self.task, description=f"{self.title}: done" if exc[0] is None else f"{self.title}: failed")
        self.progress.__exit__(*exc)

    def __call__(self, msg: str) -> None:
        self.progress.update(self.task, description=f"{self.title}: {msg}")


def compile_model(
    onnx_path: str | Path,
    backend: str,
    precision: str,
    out_dir: str | Path,
    *,
    calib: str | Path | CalibData | None = None,
    eval_data: str | Path | CalibData | None = None,
    max_accuracy_drop: float | None = None,
    calib_samples: int = 300,
    eval_samples: int | None = None,
    device: str = "CPU",
    providers: Sequence[str] | None = None,
    trt_version: str | None = None,
    trtexec_only: bool = False,
    trt_options: Any = None,
    keep_first_last_float: bool = True,
    int8_scheme: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Compile ``onnx_path`` into ``out_dir`` (replaced whole on success) and return the manifest.
    ``int8_scheme``: "auto" (static for image models, weight-only for token models), "static",
    "weights" or "dynamic" (ONNX Runtime only)."""
    t0 = time.perf_counter()
    check_request(backend, precision)
    from .openvino_backend import INT8_SCHEMES as OV_SCHEMES
    from .ort_backend import INT8_SCHEMES as ORT_SCHEMES

    allowed = {"openvino": OV_SCHEMES, "onnxruntime": ORT_SCHEMES}.get(backend, ("auto",))
    if int8_scheme not in allowed:
        raise UserError(f"--int8-scheme {int8_scheme} is not available for {backend}; choose one of {', '.join(allowed)}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a folder")
    if max_accuracy_drop is not None and not (0 < max_accuracy_drop < 1):
        raise UserError("--max-accuracy-drop is an absolute fraction, e.g. 0.01 for one point of accuracy")
    if max_accuracy_drop is not None and (backend != "openvino" or precision != "int8"):
        raise UserError("--max-accuracy-drop applies to --backend openvino --precision int8 only")
    model = ou.load_onnx(onnx_path)
    io = ou.io_info(model)
    if len(io["inputs"]) != 1:
        raise UserError(f"{onnx_path} has {len(io['inputs'])} inputs; sglp-edge compiles single-input models")
    inp = io["inputs"][0]
    calib_d = _as_data(calib, "calibration data")
    eval_d = _as_data(eval_data, "evaluation data", require_labels=max_accuracy_drop is not None)
    has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if precision == "int8" and calib_d is None and not (backend == "tensorrt" and has_qdq):
        raise UserError("INT8 needs calibration data: pass --calib DATA.npz (array 'x' of real inputs, "
                        "e.g. 300 training images)")
    for d, what in ((calib_d, "calibration data"), (eval_d, "evaluation data")):
        if d is not None:
            check_matches_input(d, inp["shape"], inp["dtype"], what=what)
    if eval_d is not None:
        eval_d = eval_d.head(eval_samples)
    parity_d, parity_note = eval_d, "evaluation data"
    if parity_d is None and calib_d is not None:
        parity_d, parity_note = calib_d.head(eval_samples or 256), "calibration samples (not held out)"
    src_meta = ou.read_metadata(model)
    del model
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": {"name": "sglp-edge", "version": _tool_version()},
        "source": {"path": str(onnx_path), "sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size,
                   "opset": src_meta.get("export", {}).get("opset"), "io": io,
                   "export": src_meta.get("export"), "parity_vs_pytorch": src_meta.get("parity_vs_pytorch")},
        "backend": {"name": backend},
        "precision": precision,
        "calibration": calib_d.describe() if calib_d is not None else None,
        "evaluation": eval_d.describe() if eval_d is not None else None,
        "host": _host(),
        "notes": [],
    }
    measured_on = None
    with _Steps(progress, f"{backend} {precision}") as say, atomic_dir(out_dir) as tmp:
        if backend == "openvino":
            from . import openvino_backend as ovb

            section = ovb.build(onnx_path, tmp, precision, calib=calib_d, eval_data=eval_d,
                                max_accuracy_drop=max_accuracy_drop, calib_samples=calib_samples, device=device,
                                keep_first_last_float=keep_first_last_float, int8_scheme=int8_scheme, progress=say)
            run = ovb.runner(tmp, precision, device) if parity_d is not None else None
        elif backend == "onnxruntime":
            from . import ort_backend as ortb

            section = ortb.build(onnx_path, tmp, precision, calib=calib_d, calib_samples=calib_samples,
                                 providers=providers, keep_first_last_float=keep_first_last_float,
                                 int8_scheme=int8_scheme, progress=say)
            run = ortb.runner(tmp, providers) if parity_d is not None else None
        else:
            section, run = _tensorrt(onnx_path, tmp, precision, io, calib_d, calib_samples, trt_version,
                                     trtexec_only, trt_options, keep_first_last_float, say)
            if parity_d is None:
                run = None
            elif trtexec_only:  # no engine here: measure the graph TensorRT will build, with ONNX Runtime
                from .ort_backend import runner as ort_runner

                run = ort_runner(tmp, ["CPUExecutionProvider"])
                measured_on = ("onnxruntime CPU on the ONNX prepared for TensorRT (the engine itself is not built "
                               "here; re-measure on the board)")
        manifest["backend"].update(section.pop("backend", {}))
        artifacts = section.pop("artifacts")
        manifest["notes"] += section.pop("notes", [])
        manifest.update(section)
        if run is not None:
            say(f"parity on {len(parity_d)} samples")
            if parity_d.logits is not None:
                ref, ref_name = parity_d.logits, "pytorch (reference logits stored in the evaluation .npz)"
            else:
                ref, ref_name = _ort_reference(onnx_path, parity_d.x), "onnxruntime fp32 on the source ONNX"
            out = _run_batched(run, parity_d.x)
            labels = parity_d.y if parity_d.kind == "image" else None
            parity = ou.compare_outputs(ref, out, labels=labels)
            parity.update(reference=ref_name, inputs=parity_note)
            if measured_on:
                parity["measured_on"] = measured_on
            if parity_d.kind == "tokens":
                parity["next_token_accuracy"] = float((out[:, :-1].argmax(-1) == parity_d.x[:, 1:]).mean())
                parity["reference_next_token_accuracy"] = float((ref[:, :-1].argmax(-1) == parity_d.x[:, 1:]).mean())
            manifest["parity"] = parity
        else:
            manifest["parity"] = None
            manifest["notes"].append("no evaluation or calibration data given: parity not measured "
                                         "(pass --eval DATA.npz)")
        say("write manifest")
        manifest["artifacts"] = [dict(a, sha256=sha256_file(tmp / a["path"]), bytes=(tmp / a["path"]).stat().st_size)
                                 for a in artifacts]
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def _tensorrt(onnx_path: Path, tmp: Path, precision: str, io: dict[str, Any], calib: CalibData | None,
              calib_samples: int, trt_version: str | None, trtexec_only: bool, opts: Any,
              keep_first_last_float: bool, say: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    from . import tensorrt_backend as tb
    from . import trt_ops

    opts = opts or tb.TrtOptions()
    opts.precision = precision
    trt = None
    if not trtexec_only:
        trt = tb.import_tensorrt()  # clear UserError naming what to install
        installed = trt.__version__
        if trt_version and tb.version_major(trt_version) != tb.version_major(installed):
            raise UserError(f"--trt-version {trt_version} differs from the installed TensorRT {installed}")
        trt_version = installed
    trt_version = trt_version or "10.3"
    major = tb.version_major(trt_version)
    src = ou.load_onnx(onnx_path)
    traits = tb.graph_traits(src)
    del src
    need_qdq_here = trtexec_only and major == 10 and precision == "int8" and not traits["has_qdq"]
    plan = tb.plan_build(opts, major, graph_has_qdq=traits["has_qdq"] or need_qdq_here, graph_is_fp16=traits["is_fp16"])
    if need_qdq_here:
        plan.notes.append("no TensorRT here to run the INT8 calibrator: prepared a symmetric Q/DQ graph instead")
    prepared = tmp / "model.onnx"
    prep_info: dict[str, Any] = {"variant": plan.onnx_variant}
    if plan.onnx_variant == "fp16" and not traits["is_fp16"]:
        say("convert the ONNX graph to FP16")
        prep_info.update(tb.make_fp16_onnx(onnx_path, prepared))
    elif plan.onnx_variant == "qdq" and not traits["has_qdq"]:
        if calib is None:
            raise UserError("INT8 for TensorRT needs calibration data to place Q/DQ nodes: pass --calib DATA.npz")
        say("insert symmetric INT8 Q/DQ nodes")
        prep_info.update(tb.make_qdq_onnx(onnx_path, prepared, calib, samples=calib_samples,
                                          keep_first_last_float=keep_first_last_float))
    else:
        shutil.copy2(onnx_path, prepared)
    say("check operators against the TensorRT ONNX parser")
    report = trt_ops.check_graph(prepared, trt_version=trt_version)
    atomic_write_json(tmp / "trt_op_check.json", report.to_dict())
    if not report.ok:
        raise UserError(f"the graph will not build with TensorRT {trt_version}: " + "; ".join(report.problems()))
    shapes = tb.profile_shapes(io["inputs"], opts)
    opts.timing_cache = opts.timing_cache or "timing.cache"
    if plan.calibrator:
        opts.calib_cache = opts.calib_cache or "calib.cache"
    cmd = tb.trtexec_command("model.onnx", "model.engine", plan, opts, shapes, times_json="times.json")
    # pipefail: `| tee` must not hide a failed trtexec (bash: dash has no pipefail)
    (tmp / "trtexec_build.sh").write_text("#!/usr/bin/env bash\n# build + time the engine on the board (run in this folder)\n"
                                          f"set -eo pipefail\n{tb.command_line(cmd)} | tee trtexec.log\n")
    artifacts = [{"path": "model.onnx", "role": f"onnx-for-tensorrt ({plan.onnx_variant})"},
                 {"path": "trt_op_check.json", "role": "tensorrt-operator-check"},
                 {"path": "trtexec_build.sh", "role": "trtexec-command"}]
    section: dict[str, Any] = {
        "backend": {"name": "tensorrt", "version": trt.__version__ if trt else None, "target_version": trt_version},
        "tensorrt": {"plan": plan.to_dict(), "options": {k: v for k, v in vars(opts).items()},
                     "profile_shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()},
                     "trtexec_command": tb.command_line(cmd), "onnx_preparation": prep_info,
                     "op_check": {"ok": report.ok, "table": report.table_version,
                                  "restrictions_to_review": report.restrictions}},
    }
    if trtexec_only:
        section["tensorrt"]["engine_built"] = False
        section["notes"] = [f"engine not built here (no TensorRT): run trtexec_build.sh on the board "
                            f"(TensorRT {trt_version})"]
        return dict(section, artifacts=artifacts), None
    say(f"build the TensorRT {trt.__version__} engine")
    cwd_opts = tb.TrtOptions(**{**vars(opts), "timing_cache": str(tmp / opts.timing_cache),
                                "calib_cache": str(tmp / opts.calib_cache) if opts.calib_cache else None})
    info = tb.build_engine(prepared, tmp / "model.engine", plan, cwd_opts, shapes, calib=calib)
    section["tensorrt"].update(engine_built=True, build=info)
    artifacts.append({"path": "model.engine", "role": "tensorrt-engine"})
    for extra, role in ((opts.timing_cache, "tensorrt-timing-cache"), (opts.calib_cache, "int8-calibration-cache")):
        if extra and (tmp / extra).is_file():
            artifacts.append({"path": extra, "role": role})
    return dict(section, artifacts=artifacts), tb.runner(tmp / "model.engine")
