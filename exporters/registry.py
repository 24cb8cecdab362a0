"""The backends, one entry each, in one registry: everything the rest of sglp-edge needs to know
about a backend without importing its runtime.

    b = get_backend("openvino")
    b.precisions, b.int8_schemes(), b.artifact, b.builds_on, b.suffixes, b.runtime_dist

``compile`` (exporters/compile.py), ``bench`` and profile validation (sglp_edge/profiles.py), the
pipeline and the targets read this registry; a new backend is one module plus one entry here.
No torch and no runtime import (the board harness imports this too; Python 3.8 compatible).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Tuple

from .errors import UserError


@dataclass(frozen=True)
class BackendSpec:
    name: str
    precisions: Tuple[str, ...]
    artifact: str  # the file the runner loads, inside a compile folder
    suffixes: Tuple[str, ...]  # artifact suffixes the on-device runner accepts
    builds_on: str  # "host": the compiled artifact is portable; "board": built on the device itself
    module: str  # exporters.<module>: compile_step(CompileRequest) and INT8_SCHEMES
    runtime_dist: str  # pip distribution of the runtime (its aarch64 wheel, for emulation)
    emulatable: bool  # an aarch64 build runs under qemu-user here
    board_artifact: str = ""  # what the board builds from the host's output ("" = same as artifact)
    run_only_precisions: Tuple[str, ...] = ()  # a runtime setting, not a compile target (OpenVINO's bf16 hint)
    accuracy_control: bool = False  # INT8 with an accuracy-drop limit (NNCF accuracy control)
    int8_from_qdq_graph: bool = False  # INT8 straight from a Q/DQ graph, without calibration data

    @property
    def run_precisions(self) -> Tuple[str, ...]:
        """Precisions a device profile may ask the runtime for."""
        return self.precisions + self.run_only_precisions

    def int8_schemes(self) -> Tuple[str, ...]:
        mod = importlib.import_module(f"exporters.{self.module}")
        return tuple(getattr(mod, "INT8_SCHEMES", ("auto",)))

    def impl(self):
        return importlib.import_module(f"exporters.{self.module}")

    @property
    def host_artifact(self) -> str:
        """The file compile writes on the host (for board-built backends, the ONNX the board builds from)."""
        return self.artifact


BACKENDS: Dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("openvino", ("fp32", "fp16", "int8"), "model.xml", (".xml", ".onnx"), "host", "openvino_backend",
                "openvino", True, run_only_precisions=("bf16",), accuracy_control=True),
    BackendSpec("onnxruntime", ("fp32", "int8"), "model.onnx", (".onnx", ".ort"), "host", "ort_backend",
                "onnxruntime", True),
    BackendSpec("tensorrt", ("fp32", "fp16", "int8"), "model.onnx", (".engine", ".plan", ".trt", ".onnx"), "board",
                "tensorrt_compile", "tensorrt", False, board_artifact="model.engine", int8_from_qdq_graph=True),
)}
NAMES: Tuple[str, ...] = tuple(BACKENDS)


def get_backend(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}") from None


def backend_for_file(path: str) -> str:
    """The backend an artifact file belongs to, from its suffix (an .onnx runs on ONNX Runtime)."""
    s = "." + str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else ""
    for b in BACKENDS.values():
        if s == ".onnx":
            return "onnxruntime"
        if s in b.suffixes:
            return b.name
    raise UserError(f"cannot tell the backend of {path!r} from its suffix; pass --backend ({', '.join(NAMES)})")
