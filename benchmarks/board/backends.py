"""The backends, one entry each, in one registry: everything the rest of sglp-edge needs to know
about a backend without importing its runtime.

    b = get_backend("openvino")
    b.precisions, b.int8_schemes(), b.artifact, b.builds_on, b.suffixes, b.runtime_dist, b.tasks

Who reads it: ``compile`` (exporters/compile.py: ``module``), the on-device runner choice
(benchmarks/board/runners.py: ``runner``), the board benchmark (run_bench.py: ``board_build``,
``gpu_memory``; lm_bench.py: ``lm_session``), the LM compile (exporters/lm_compile.py:
``lm_precisions``, ``artifact``), the LM routes of ``sglp-edge run`` (sglp_edge/tasks/lm_routes.py:
``lm_route``), profile validation (sglp_edge/profiles/schema.py), the emulated ARM runtimes
(sglp_edge/targets/arm64_env.py: ``runtime_dist``), the pipeline and the targets.
A new backend is one entry here, one runner module (benchmarks/board/runner_<name>.py) and one
compile module (exporters/<name>.py).

An LM-only backend (``tasks == ("causal-lm",)``, e.g. onnxruntime-genai) has no image ``compile``
module: its artifact is a folder (``folder_artifact``) that the causal-LM task builds itself
(sglp_edge/tasks/lm_routes.py).

Modules are named here by their full dotted path and imported only when used (a runtime import is
heavy). No torch and no runtime import (the board harness imports this too; Python 3.8 compatible).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

from benchmarks.board.errors import UserError


@dataclass(frozen=True)
class BackendSpec:
    name: str
    precisions: Tuple[str, ...]
    artifact: str  # the file the runner loads, inside a compile folder
    suffixes: Tuple[str, ...]  # artifact suffixes the on-device runner accepts
    builds_on: str  # "host": the compiled artifact is portable; "board": built on the device itself
    module: str  # host compile module, dotted (exporters.<module>): compile_step(CompileRequest), INT8_SCHEMES
    runtime_dist: str  # pip distribution of the runtime (its aarch64 wheel, for emulation)
    emulatable: bool  # an aarch64 build runs under qemu-user here
    board_artifact: str = ""  # what the board builds from the host's output ("" = same as artifact)
    run_only_precisions: Tuple[str, ...] = ()  # a runtime setting, not a compile target (OpenVINO's bf16 hint)
    accuracy_control: bool = False  # INT8 with an accuracy-drop limit (NNCF accuracy control)
    int8_from_qdq_graph: bool = False  # INT8 straight from a Q/DQ graph, without calibration data
    tasks: Tuple[str, ...] = ("image-classification", "causal-lm")  # what a device profile may run on it
    folder_artifact: bool = False  # the artifact is the compile folder itself (``artifact`` marks it)
    runtime_deps: Tuple[str, ...] = ()  # further pip distributions its aarch64 runtime imports
    runner: str = ""  # on-device runner module, dotted (its RUNNER class; benchmarks/board/runners.py)
    board_build: str = ""  # module.function building the runnable artifact on the board from an .onnx
    gpu_memory: bool = False  # the model's memory is GPU memory (on a Jetson: nvmap, from tegrastats)
    providers: bool = False  # a profile may choose its execution providers
    lm_precisions: Tuple[str, ...] = ()  # exporters/lm_compile.py compiles a decoder LM's graph in these
    lm_route: str = ""  # how `sglp-edge run` brings a causal LM to it (sglp_edge/tasks/lm_routes.py)
    lm_session: str = ""  # the board's decode loop (benchmarks/board/lm_bench.py): "graph" | "genai" | "llama.cpp"

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
        mod = importlib.import_module(self.module)  # heavy: the compile module imports onnx
        return tuple(getattr(mod, "INT8_SCHEMES", ("auto",)))

    def impl(self):
        if not self.module:
            raise UserError(f"backend {self.name} runs decoder LMs only ({', '.join(self.tasks)}); "
                            "it has no image compile step")
        return importlib.import_module(self.module)  # heavy: the compile module imports onnx

    @property
    def host_artifact(self) -> str:
        """The file compile writes on the host (for board-built backends, the ONNX the board builds from)."""
        return self.artifact


BACKENDS: Dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("openvino", ("fp32", "fp16", "int8"), "model.xml", (".xml", ".onnx"), "host",
                "exporters.openvino_backend", "openvino", True, run_only_precisions=("bf16",), accuracy_control=True,
                runner="benchmarks.board.runner_openvino", lm_precisions=("fp32", "fp16", "int8", "int4"), lm_route="openvino", lm_session="graph"),
    BackendSpec("onnxruntime", ("fp32", "int8"), "model.onnx", (".onnx", ".ort"), "host", "exporters.ort_backend",
                "onnxruntime", True, runner="benchmarks.board.runner_onnxruntime",
                providers=True, lm_precisions=("fp32", "int8", "int4"), lm_route="onnx", lm_session="graph"),
    BackendSpec("tensorrt", ("fp32", "fp16", "int8"), "model.onnx", (".engine", ".plan", ".trt", ".onnx"), "board",
                "exporters.tensorrt_compile", "tensorrt", False, board_artifact="model.engine", int8_from_qdq_graph=True,
                runner="benchmarks.board.runner_tensorrt",
                board_build="benchmarks.board.trt_build.build_trt_engine", gpu_memory=True,
                lm_precisions=("fp32", "fp16"), lm_route="onnx"),
    # onnxruntime-genai's model builder + generator (sglp_edge.export.lm_genai, benchmarks/board/lm_genai.py):
    # a folder (model.onnx, genai_config.json, tokenizer); weight-only int8/int4 are builder options
    BackendSpec("onnxruntime-genai", ("fp32", "int8", "int4"), "genai_config.json", (), "host", "",
                "onnxruntime-genai", True, tasks=("causal-lm",), folder_artifact=True,
                runtime_deps=("onnxruntime",), lm_route="genai", lm_session="genai"),
    # llama.cpp (benchmarks/board/llama_cpp.py, lm_llama_cpp.py): a GGUF built on the host by
    # sglp_edge.export.gguf (fp16 -> F16, int8 -> Q8_0, int4 -> Q4_0: sglp_edge/tasks/lm_routes.py),
    # measured on the board by llama.cpp's own tools (built there with `make llama-cpp`: no pip runtime)
    BackendSpec("llama.cpp", ("fp16", "int8", "int4"), "model.gguf", (".gguf",), "host", "", "", False,
                tasks=("causal-lm",), lm_route="gguf", lm_session="llama.cpp"),
)}
NAMES: Tuple[str, ...] = tuple(BACKENDS)
#: backends with an image compile step (exporters/compile.py, sglp-edge compile)
IMAGE_NAMES: Tuple[str, ...] = tuple(n for n, b in BACKENDS.items() if b.image)
#: the backend an ``.onnx`` runs on when none is named (every ONNX-taking backend accepts one)
ONNX_BACKEND = "onnxruntime"


def get_backend(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}") from None


def backend_for_file(path: str | os.PathLike) -> str:
    """The backend an artifact file belongs to, from its suffix (an .onnx runs on :data:`ONNX_BACKEND`)."""
    s = Path(path).suffix.lower()
    if s == ".onnx":
        return ONNX_BACKEND
    for b in BACKENDS.values():
        if s in b.suffixes:
            return b.name
    raise UserError(f"cannot tell the backend from {Path(path).name!r}: pass --backend "
                    f"{'|'.join(n for n, b in BACKENDS.items() if b.runner)}")


def resolve(dotted: str) -> Any:
    """``package.module.name`` -> that object, the module imported now (a registry entry's lazy
    reference: a runtime import is heavy)."""
    mod, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), name)  # heavy: a runtime's module
