"""OpenVINO runner for the on-device benchmark (numpy + ``openvino``; no torch).

``openvino.Core().compile_model`` of an IR (``.xml`` + ``.bin``) or ONNX file, with
``PERFORMANCE_HINT``, ``INFERENCE_NUM_THREADS``, ``NUM_STREAMS`` and ``INFERENCE_PRECISION_HINT`` set
explicitly and read back from the compiled model. ``openvino`` is imported only when a runner is
opened. The shared interface is :class:`benchmarks.board.runner_base.Runner`; open it through
:func:`benchmarks.board.runners.open_runner`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.board.errors import UserError
from benchmarks.board.runner_base import Runner, TensorSpec, UnsupportedBatch


# int8: the quantized layers run in INT8 whatever the hint; the rest in f32, exactly as compile-time
# parity measured it (exporters/openvino_backend.py HINT_FOR), never the plugin's bf16/f16 default
_OV_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}


def _port_name(port: Any, index: int, kind: str) -> str:
    names = port.get_names()  # models converted from PyTorch may leave outputs unnamed
    return sorted(names)[0] if names else f"{kind}{index}"


class OpenVINORunner(Runner):
    backend = "openvino"
    options = ("device",)

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        threads: Optional[int] = None,
        streams: int = 1,
        precision: str = "fp32",
        device: str = "CPU",
        hint: Optional[str] = "LATENCY",  # None/"NONE": leave the device default (as benchmark_app -hint none)
        input_shapes: dict[str, list[int]] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            import openvino as ov  # heavy: openvino
        except ImportError:
            raise UserError("OpenVINO is not installed on this machine: pip install openvino") from None
        self._ov = ov
        self._common(artifact, threads, streams, precision)
        self.device, self.hint = device, (hint or "NONE").upper()
        self.extra_config = dict(extra_config or {})
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as e:  # openvino raises RuntimeError with a long message
            raise UserError(f"OpenVINO cannot read {self.path}: {str(e).splitlines()[0]}") from None
        declared = []
        for port in self.model.inputs:
            ps = port.get_partial_shape()
            if ps.rank.is_dynamic:
                if not input_shapes:
                    raise UserError(f"input {port.get_any_name()!r} has a dynamic rank: give --input-shape NAME=1x...")
                shape = list(input_shapes.get(port.get_any_name(), input_shapes.get("", [])))
            else:
                shape = [d.get_length() if d.is_static else None for d in ps]
            declared.append(TensorSpec(_port_name(port, len(declared), "input"), shape,
                                       port.get_element_type().to_dtype().name))
        self.output_names = [_port_name(p, i, "output") for i, p in enumerate(self.model.outputs)]
        self._declared = self._resolve(declared, input_shapes)
        self.inputs = list(self._declared)
        self.compiled = None
        self.request = None
        first = self._declared[0].shape[0] if self._declared and self._declared[0].shape else None
        self.set_batch(first if isinstance(first, int) else 1)

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        if self.hint and self.hint != "NONE":
            cfg["PERFORMANCE_HINT"] = self.hint
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.streams:
            cfg["NUM_STREAMS"] = int(self.streams)
        if self.precision in _OV_PRECISION and self.device.upper().startswith(("CPU", "GPU")):
            cfg["INFERENCE_PRECISION_HINT"] = _OV_PRECISION[self.precision]
        cfg.update(self.extra_config)
        return cfg

    def set_batch(self, batch: int) -> None:
        specs = self._with_batch(self._declared, batch)
        for s in specs:
            if not s.is_static():
                raise UserError(
                    f"input {s.name!r} has dynamic dims {s.shape}: give the shape with --input-shape "
                    f"{s.name}=1x... (or `inputs:` in the device profile)"
                )
        try:
            # static shapes compile to the fastest kernels (benchmark_app does the same with -b)
            self.model.reshape({port: s.shape for port, s in zip(self.model.inputs, specs)})
        except Exception as e:
            raise UnsupportedBatch(f"OpenVINO cannot reshape to batch {batch}: {str(e).splitlines()[0]}") from None
        try:
            self.compiled = self.core.compile_model(self.model, self.device, self._config())
        except Exception as e:
            raise UserError(f"OpenVINO cannot compile {self.path.name} for {self.device}: {str(e).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.inputs = specs
        self.batch = batch

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
        self.check_feeds(feeds)
        req = self.request
        for i, s in enumerate(self.inputs):
            arr = np.ascontiguousarray(feeds[s.name], dtype=np.dtype(s.dtype))
            req.set_input_tensor(i, self._ov.Tensor(arr))
        return req.infer

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.check_feeds(feeds)
        res = self.request.infer({i: np.ascontiguousarray(feeds[s.name], dtype=np.dtype(s.dtype))
                                  for i, s in enumerate(self.inputs)})
        return [np.array(res[o]) for o in self.compiled.outputs]

    def info(self) -> dict[str, Any]:
        def prop(key: str) -> Any:
            try:
                v = self.compiled.get_property(key)
            except Exception:
                return None
            if isinstance(v, (int, float, bool, str)) or v is None:
                return v
            if isinstance(v, (list, tuple)):
                return [str(x) for x in v]
            if hasattr(v, "get_type_name"):  # openvino.Type, e.g. f32 / f16 / bf16
                return v.get_type_name()
            return str(v)

        used_prec = prop("INFERENCE_PRECISION_HINT")
        try:
            device_name = self.core.get_property(self.device.split(":")[0], "FULL_DEVICE_NAME")
        except Exception:
            device_name = None
        return {
            "backend": self.backend,
            "runtime": "openvino",
            "runtime_version": self._ov.get_version(),
            "device": self.device,
            "device_name": device_name,
            "precision_requested": self.precision,
            "precision_used": used_prec,
            "threads_requested": self.threads,
            "threads_used": prop("INFERENCE_NUM_THREADS"),
            "streams_requested": self.streams,
            "streams_used": prop("NUM_STREAMS"),
            "performance_hint": prop("PERFORMANCE_HINT"),
            "cpu_pinning": prop("ENABLE_CPU_PINNING"),
            "execution_devices": prop("EXECUTION_DEVICES"),
            "optimal_infer_requests": prop("OPTIMAL_NUMBER_OF_INFER_REQUESTS"),
            "config_set": {k: str(v) for k, v in self._config().items()},
        }

    def close(self) -> None:
        self.request = None
        self.compiled = None


#: what benchmarks.board.runners.open_runner opens (the backend registry names this module)
RUNNER = OpenVINORunner
