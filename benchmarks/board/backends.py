"""The backends, one entry each, in one registry: everything the rest of sglp-edge needs to know
about a backend without importing its runtime.

    b = get_backend("openvino")
    b.precisions, b.int8_schemes(), b.artifact, b.builds_on, b.suffixes, b.runtime_dist, b.tasks

An LM-only backend (``tasks == ("causal-lm",)``, e.g. onnxruntime-genai) has no image ``compile``
module: its artifact is a folder (``folder_artifact``) that the causal-LM task builds itself
(sglp_edge/tasks/lm_routes.py).

``compile`` (exporters/compile.py), ``bench`` and profile validation (sglp_edge/profiles/load.py), the
pipeline and the targets read this registry; a new backend is one module plus one entry here.
No torch and no runtime import (the board harness imports this too; Python 3.8 compatible).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Tuple

from benchmarks.board.errors import UserError


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
    tasks: Tuple[str, ...] = ("image-classification", "causal-lm")  # what a device profile may run on it
    folder_artifact: bool = False  # the artifact is the compile folder itself (``artifact`` marks it)
    runtime_deps: Tuple[str, ...] = ()  # further pip distributions its aarch64 runtime imports

    @property
    def image(self) -> bool:
        """It compiles image models (``exporters.compile``): it has a compile module."""
        return "image-classification" in self.tasks

    @property
    def run_precisions(self) -> Tuple[str, ...]:
        """Precisions a device profile may ask the runtime for."""
        return self.precisions + self.run_only_precisions

    def int8_schemes(self) -> Tuple[str, ...]:
        if not self.module:
            return ()
        mod = importlib.import_module(f"exporters.{self.module}")
        return tuple(getattr(mod, "INT8_SCHEMES", ("auto",)))

    def impl(self):
        if not self.module:
            raise UserError(f"backend {self.name} runs decoder LMs only ({', '.join(self.tasks)}); "
                            "it has no image compile step")
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
    # onnxruntime-genai's model builder + generator (sglp_edge.export.lm_genai, benchmarks/board/lm_genai.py):
    # a folder (model.onnx, genai_config.json, tokenizer); weight-only int8/int4 are builder options
    BackendSpec("onnxruntime-genai", ("fp32", "int8", "int4"), "genai_config.json", (), "host", "",
                "onnxruntime-genai", True, tasks=("causal-lm",), folder_artifact=True,
                runtime_deps=("onnxruntime",)),
)}
NAMES: Tuple[str, ...] = tuple(BACKENDS)
#: backends with an image compile step (exporters/compile.py, sglp-edge compile)
IMAGE_NAMES: Tuple[str, ...] = tuple(n for n, b in BACKENDS.items() if b.image)


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
