"""ONNX Runtime runner for the on-device benchmark (numpy + ``onnxruntime``; no torch).

``onnxruntime.InferenceSession`` with ``intra_op_num_threads`` fixed, ``inter_op_num_threads = 1``,
sequential execution, chosen execution providers (CPU by default; XNNPACK/ACL on ARM where the ORT
build has them). ``onnxruntime`` is imported only when a runner is opened. The shared interface is
:class:`benchmarks.board.runner_base.Runner`; open it through :func:`benchmarks.board.runners.open_runner`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks.board.errors import UserError
from benchmarks.board.runner_base import Runner, TensorSpec, UnsupportedBatch


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(bfloat16)": "float32",
}


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"
    options = ("providers",)

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        threads: Optional[int] = None,
        streams: int = 1,
        precision: str = "fp32",
        providers: Sequence[str] | None = None,
        input_shapes: dict[str, list[int]] | None = None,
    ) -> None:
        super().__init__()
        try:
            import onnxruntime as ort  # heavy: onnxruntime
        except ImportError:
            raise UserError("ONNX Runtime is not installed on this machine: pip install onnxruntime") from None
        self._ort = ort
        self._common(artifact, threads, streams, precision)
        available = ort.get_available_providers()
        wanted = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UserError(
                f"ONNX Runtime on this machine lacks {missing} (it has {available}); "
                "install an onnxruntime build with it or change `providers` in the device profile"
            )
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self._so = so
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=wanted)
        except Exception as e:
            raise UserError(f"ONNX Runtime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        declared = []
        for i in self.session.get_inputs():
            shape = [d if isinstance(d, int) and d >= 0 else None for d in i.shape]
            declared.append(TensorSpec(i.name, shape, _ORT_TYPES.get(i.type, "float32")))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._declared = self._resolve(declared, input_shapes)
        first = self._declared[0].shape[0] if self._declared and self._declared[0].shape else None
        self._static_batch = first if isinstance(first, int) else None
        # a batch given in --input-shape for a dynamic-batch model is only the default
        decl0 = declared[0].shape[0] if declared and declared[0].shape else None
        self._dynamic_batch = not isinstance(decl0, int)
        self.set_batch(first if isinstance(first, int) else 1)

    def set_batch(self, batch: int) -> None:
        if not self._dynamic_batch and self._static_batch not in (None, batch):
            raise UnsupportedBatch(
                f"{self.path.name} has a static batch of {self._static_batch}; export it with a dynamic batch "
                "axis to sweep batch sizes"
            )
        self.inputs = self._with_batch(self._declared, batch)
        self.batch = batch

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
        self.check_feeds(feeds)
        bound = {s.name: np.ascontiguousarray(feeds[s.name], dtype=np.dtype(s.dtype)) for s in self.inputs}
        run = self.session.run

        def call() -> Any:
            return run(None, bound)

        return call

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.check_feeds(feeds)
        return self.session.run(None, {s.name: np.ascontiguousarray(feeds[s.name], dtype=np.dtype(s.dtype)) for s in self.inputs})

    def info(self) -> dict[str, Any]:
        in_types = sorted({i.type for i in self.session.get_inputs()})
        return {
            "backend": self.backend,
            "runtime": "onnxruntime",
            "runtime_version": self._ort.__version__,
            "device": self._ort.get_device(),
            "providers": self.session.get_providers(),
            "precision_requested": self.precision,
            # ONNX Runtime never changes precision: what runs is what the graph stores.
            "precision_used": f"as stored in the ONNX graph (inputs {', '.join(in_types)})",
            "threads_requested": self.threads,
            "threads_used": self._so.intra_op_num_threads or None,
            "inter_op_threads": self._so.inter_op_num_threads,
            "streams_requested": self.streams,
            "streams_used": 1,
            "execution_mode": "sequential",
            "graph_optimization_level": "ORT_ENABLE_ALL",
        }

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


#: what benchmarks.board.runners.open_runner opens (the backend registry names this module)
RUNNER = OnnxRuntimeRunner
