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
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.board.atomic import atomic_dir, atomic_write_json, sha256_file
from benchmarks.board.backends import BACKENDS as _REGISTRY
from benchmarks.board.backends import BackendSpec, get_backend
from benchmarks.board.calib import CalibData, batches, check_matches_input, load_npz
from benchmarks.board.errors import UserError
from exporters import onnx_utils as ou
from exporters.stack import CompileRequest, stack_runner

MANIFEST_FORMAT = "sglp-edge/compile-manifest/1"
MANIFEST_NAME = "manifest.json"
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {n: b.precisions for n, b in _REGISTRY.items() if b.image}


def _tool_version() -> str:
    try:
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
    if backend in _REGISTRY and not _REGISTRY[backend].image:
        raise UserError(f"backend {backend} runs decoder LMs only: build it with `sglp-edge export MODEL --genai` "
                        f"or an LM `sglp-edge run`, not sglp-edge compile ({', '.join(BACKEND_PRECISIONS)})")
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
    return stack_runner("onnxruntime", onnx_path, "fp32", providers=["CPUExecutionProvider"])(x)

def _run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([fn(b) for b in batches(x, batch)], 0)


class _Steps:
    """Rich progress: one spinner line whose text follows the backend's steps."""

    def __init__(self, enabled: bool, title: str):
        from rich.progress import (  # heavy: rich is a host-only dependency; compile runs on boards without it
            Progress, SpinnerColumn, TextColumn, TimeElapsedColumn)

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


def _check_options(spec: BackendSpec, precision: str, out_dir: Path, *, device: str, int8_scheme: str,
                   max_accuracy_drop: float | None) -> None:
    """The options checked before any work (the compile module's own ``check_device`` where it has one)."""
    check_device = getattr(spec.impl(), "check_device", None)
    if check_device is not None:
        check_device(device)
    allowed = spec.int8_schemes()
    if int8_scheme not in allowed:
        raise UserError(f"--int8-scheme {int8_scheme} is not available for {spec.name}; choose one of {', '.join(allowed)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a folder")
    if max_accuracy_drop is not None and not (0 < max_accuracy_drop < 1):
        raise UserError("--max-accuracy-drop is an absolute fraction, e.g. 0.01 for one point of accuracy")
    if max_accuracy_drop is not None and (not spec.accuracy_control or precision != "int8"):
        with_ac = [n for n, b in _REGISTRY.items() if b.accuracy_control]
        raise UserError(f"--max-accuracy-drop applies to --backend {'|'.join(with_ac)} --precision int8 only")


def _source(spec: BackendSpec, onnx_path: Path, precision: str, calib: Any, eval_data: Any, *,
            max_accuracy_drop: float | None, eval_samples: int | None) -> dict[str, Any]:
    """The source graph read and checked with its data: io, metadata, calibration / evaluation / parity sets."""
    model = ou.load_onnx(onnx_path)
    io = ou.io_info(model)
    if len(io["inputs"]) != 1:
        raise UserError(f"{onnx_path} has {len(io['inputs'])} inputs; sglp-edge compiles single-input models")
    inp = io["inputs"][0]
    calib_d = _as_data(calib, "calibration data")
    eval_d = _as_data(eval_data, "evaluation data", require_labels=max_accuracy_drop is not None)
    has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if precision == "int8" and calib_d is None and not (spec.int8_from_qdq_graph and has_qdq):
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
    return {"io": io, "meta": ou.read_metadata(model), "calib": calib_d, "eval": eval_d, "parity": parity_d,
            "parity_note": parity_note}


def _manifest_head(onnx_path: Path, backend: str, precision: str, src: dict[str, Any]) -> dict[str, Any]:
    src_meta, calib_d, eval_d = src["meta"], src["calib"], src["eval"]
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": {"name": "sglp-edge", "version": _tool_version()},
        "source": {"path": str(onnx_path), "sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size,
                   "opset": src_meta.get("export", {}).get("opset"), "io": src["io"],
                   "export": src_meta.get("export"), "parity_vs_pytorch": src_meta.get("parity_vs_pytorch")},
        "backend": {"name": backend},
        "precision": precision,
        "calibration": calib_d.describe() if calib_d is not None else None,
        "evaluation": eval_d.describe() if eval_d is not None else None,
        "host": _host(),
        "notes": [],
    }


def _parity(run: Callable[[np.ndarray], np.ndarray], parity_d: CalibData, parity_note: str, onnx_path: Path,
            parity_batch: int, measured_on: Any) -> dict[str, Any]:
    """The compiled artifact against PyTorch's stored logits (else ONNX Runtime FP32 on the source)."""
    if parity_d.logits is not None:
        ref, ref_name = parity_d.logits, "pytorch (reference logits stored in the evaluation .npz)"
    else:
        ref, ref_name = _ort_reference(onnx_path, parity_d.x), "onnxruntime fp32 on the source ONNX"
    out = _run_batched(run, parity_d.x, batch=parity_batch)
    labels = parity_d.y if parity_d.kind == "image" else None
    parity = ou.compare_outputs(ref, out, labels=labels)
    parity.update(reference=ref_name, inputs=parity_note)
    if measured_on:
        parity["measured_on"] = measured_on
    if parity_d.kind == "tokens":
        parity["next_token_accuracy"] = float((out[:, :-1].argmax(-1) == parity_d.x[:, 1:]).mean())
        parity["reference_next_token_accuracy"] = float((ref[:, :-1].argmax(-1) == parity_d.x[:, 1:]).mean())
    return parity


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
    spec = get_backend(backend)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    _check_options(spec, precision, out_dir, device=device, int8_scheme=int8_scheme,
                   max_accuracy_drop=max_accuracy_drop)
    src = _source(spec, onnx_path, precision, calib, eval_data, max_accuracy_drop=max_accuracy_drop,
                  eval_samples=eval_samples)
    parity_d = src["parity"]
    manifest = _manifest_head(onnx_path, backend, precision, src)
    req = CompileRequest(onnx_path=onnx_path, out=out_dir, precision=precision, io=src["io"], calib=src["calib"],
                         eval_data=src["eval"], max_accuracy_drop=max_accuracy_drop, calib_samples=calib_samples,
                         device=device, providers=providers, trt_version=trt_version, trtexec_only=trtexec_only,
                         trt_options=trt_options, keep_first_last_float=keep_first_last_float,
                         int8_scheme=int8_scheme, want_runner=parity_d is not None)
    with _Steps(progress, f"{backend} {precision}") as say, atomic_dir(out_dir) as tmp:
        req.out, req.say = tmp, say
        section, run, measured_on = spec.impl().compile_step(req)
        parity_batch = section.pop("parity_batch", 64)
        manifest["backend"].update(section.pop("backend", {}))
        artifacts = section.pop("artifacts")
        manifest["notes"] += section.pop("notes", [])
        manifest.update(section)
        if run is not None:
            say(f"parity on {len(parity_d)} samples")
            manifest["parity"] = _parity(run, parity_d, src["parity_note"], onnx_path, parity_batch, measured_on)
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
