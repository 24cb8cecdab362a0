"""Backend runners for the on-device benchmark (numpy + the backend's own runtime; no torch).

One class per backend, all with the same small interface (:class:`Runner`):

* ``inputs``            -> list of :class:`TensorSpec` (name, shape at the current batch, dtype)
* ``set_batch(b)``      -> reshape/recompile for batch ``b``; raises :class:`UnsupportedBatch`
* ``bind(feeds)``       -> a no-argument callable running one inference on those inputs
* ``sync()``            -> block until queued device work is done (no-op for CPU runtimes)
* ``infer(feeds)``      -> outputs as numpy arrays (host memory)
* ``info()``            -> what was actually used: runtime version, threads, streams, precision

Backends:

* ``openvino``    -- ``openvino.Core().compile_model`` of an IR (``.xml`` + ``.bin``) or ONNX file,
  with ``PERFORMANCE_HINT``, ``INFERENCE_NUM_THREADS``, ``NUM_STREAMS`` and
  ``INFERENCE_PRECISION_HINT`` set explicitly and read back from the compiled model.
* ``onnxruntime`` -- ``onnxruntime.InferenceSession`` with ``intra_op_num_threads`` fixed,
  ``inter_op_num_threads = 1``, sequential execution, chosen execution providers (CPU by default;
  XNNPACK/ACL on ARM where the ORT build has them).
* ``tensorrt``    -- a serialized engine (``.engine``/``.plan``) run with TensorRT 10/11
  ``execute_async_v3`` on a CUDA stream; device buffers through ``cuda-python``
  (``cuda.bindings.runtime``, or the older ``cuda.cudart``) or ``cupy``, whichever is installed.
  All imports are lazy; a missing package is a :class:`~exporters.errors.UserError` naming what to
  install. Timed calls include host->device copy, execution and device->host copy ("host
  latency", what an application sees); the stream is synchronised before every clock read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from exporters.errors import UserError

from exporters.registry import NAMES as BACKENDS  # noqa: E402  (one registry of backends)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class UnsupportedBatch(Exception):
    """The artifact cannot run at the requested batch size (static shape / engine profile)."""


@dataclass
class TensorSpec:
    name: str
    shape: list[Optional[int]]  # None = dynamic, still to be resolved
    dtype: str  # numpy dtype name

    def is_static(self) -> bool:
        return all(isinstance(d, int) and d >= 0 for d in self.shape)


def parse_shape(text: str) -> list[int]:
    """``1x3x32x32`` or ``1,3,32,32`` or ``[1,3,32,32]`` -> [1, 3, 32, 32]."""
    t = text.strip().strip("[]()")
    parts = [p for p in t.replace("x", ",").replace("X", ",").split(",") if p.strip()]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"bad shape {text!r}: use integers separated by 'x' or ',', e.g. 1x3x32x32") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"bad shape {text!r}: every dimension must be a positive integer")
    return dims


def artifact_files(path: str | os.PathLike, backend: str) -> list[Path]:
    """Files that make up the artifact (for model size and for bundling)."""
    p = Path(path)
    files = [p]
    if p.suffix.lower() == ".xml":
        b = p.with_suffix(".bin")
        if b.exists():
            files.append(b)
    elif p.suffix.lower() == ".onnx":
        for cand in (p.with_name(p.name + ".data"), p.with_suffix(".data"), p.with_name(p.name + "_data"),
                     p.with_suffix(".onnx.data")):
            if cand.exists() and cand not in files:
                files.append(cand)
    return files


def artifact_size_bytes(path: str | os.PathLike, backend: str) -> int:
    return sum(f.stat().st_size for f in artifact_files(path, backend))


def random_feeds(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic inputs for latency runs: N(0,1) floats, zeros for integer inputs (token ids,
    masks are then all-valid ones)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        if not s.is_static():
            raise UserError(
                f"input {s.name!r} has a dynamic shape {s.shape}: give it with --input-shape "
                f"{s.name}=1x... (or `inputs:` in the device profile)"
            )
        dt = np.dtype(s.dtype)
        if np.issubdtype(dt, np.floating):
            feeds[s.name] = rng.standard_normal(s.shape).astype(dt)
        elif "mask" in s.name.lower():
            feeds[s.name] = np.ones(s.shape, dtype=dt)
        else:
            feeds[s.name] = np.zeros(s.shape, dtype=dt)
    return feeds


class Runner:
    backend = "base"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.output_names: list[str] = []
        self.batch: Optional[int] = None

    def _common(self, artifact: str | os.PathLike, threads: Optional[int], streams: int, precision: str) -> None:
        """Checks and settings every backend shares: the artifact exists, the precision is known."""
        self.path = Path(artifact)
        if not self.path.exists():
            raise UserError(f"artifact not found: {self.path}")
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.threads, self.streams, self.precision = threads, streams, precision

    # -- interface -----------------------------------------------------------------------------
    def set_batch(self, batch: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:  # pragma: no cover
        raise NotImplementedError

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def sync(self) -> None:
        return None

    def info(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        return None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------
    def _resolve(self, declared: list[TensorSpec], overrides: dict[str, list[int]] | None) -> list[TensorSpec]:
        overrides = dict(overrides or {})
        out = []
        for spec in declared:
            shape = list(spec.shape)
            given = None
            if spec.name in overrides:
                given = shape = list(overrides.pop(spec.name))
            elif len(declared) == 1 and "" in overrides:
                given = shape = list(overrides.pop(""))
            if spec.shape and given is not None:
                if len(shape) != len(spec.shape):
                    raise UserError(
                        f"input {spec.name!r} has rank {len(spec.shape)} {spec.shape} but the given shape is {shape}"
                    )
                for i, (want, got) in enumerate(zip(spec.shape, shape)):
                    if i > 0 and isinstance(want, int) and want != got:
                        raise UserError(
                            f"input {spec.name!r} is fixed at {spec.shape} in the model but the profile/--input-shape "
                            f"says {shape}; fix the profile's inputs"
                        )
            out.append(TensorSpec(spec.name, shape, spec.dtype))
        extra = [k for k in overrides if k]
        if extra:
            raise UserError(
                f"--input-shape names unknown input(s) {extra}; the model's inputs are {[s.name for s in declared]}"
            )
        return out

    def _with_batch(self, specs: list[TensorSpec], batch: int) -> list[TensorSpec]:
        out = []
        for s in specs:
            shape = list(s.shape)
            if shape:
                shape[0] = batch
            out.append(TensorSpec(s.name, shape, s.dtype))
        return out

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        names = {s.name for s in self.inputs}
        missing = names - set(feeds)
        if missing:
            raise UserError(f"missing input(s) {sorted(missing)} (the model's inputs are {sorted(names)})")


# ============================================================================================
# OpenVINO
# ============================================================================================

# int8: the quantized layers run in INT8 whatever the hint; the rest in f32, exactly as compile-time
# parity measured it (exporters/openvino_backend.py HINT_FOR), never the plugin's bf16/f16 default
_OV_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}


def _port_name(port: Any, index: int, kind: str) -> str:
    names = port.get_names()  # models converted from PyTorch may leave outputs unnamed
    return sorted(names)[0] if names else f"{kind}{index}"


class OpenVINORunner(Runner):
    backend = "openvino"

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
            import openvino as ov
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


# ============================================================================================
# ONNX Runtime
# ============================================================================================

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
            import onnxruntime as ort
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


# ============================================================================================
# TensorRT
# ============================================================================================


class _CudaPython:
    """Device memory and streams through NVIDIA's cuda-python (``cuda.bindings.runtime``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        self.rt = cudart
        self._pinned: list = []
        self.stream = self._ok(cudart.cudaStreamCreate())
        try:
            import cuda as _c

            self.version = getattr(_c, "__version__", None)
        except Exception:  # pragma: no cover
            self.version = None

    def _ok(self, res: Any) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise UserError(f"CUDA error {err} (is the GPU visible to this process?)")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def pinned(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A page-locked host array (cudaMallocHost): copies from it are true async DMA, as trtexec's."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        ptr = int(self._ok(self.rt.cudaMallocHost(max(n, 1))))
        self._pinned.append(ptr)
        return _wrap_host(ptr, n, shape, dt)

    def free_pinned(self) -> None:
        for p in self._pinned:
            self.rt.cudaFreeHost(p)
        self._pinned = []

    def h2d(self, dst: int, src: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def d2h(self, dst: np.ndarray, src: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def stream_handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))


class _CuPy:
    """Device memory and streams through CuPy."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy as cp

        self.cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._keep: dict[int, Any] = {}
        self._pinned: list = []
        self.version = cp.__version__

    def malloc(self, nbytes: int) -> int:
        mem = self.cp.cuda.alloc(max(int(nbytes), 1))
        self._keep[int(mem.ptr)] = mem
        return int(mem.ptr)

    def free(self, ptr: int) -> None:
        self._keep.pop(ptr, None)

    def pinned(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        mem = self.cp.cuda.alloc_pinned_memory(max(n, 1))
        self._pinned.append(mem)
        return np.frombuffer(mem, dtype=dt, count=int(np.prod(shape))).reshape(tuple(shape))

    def free_pinned(self) -> None:
        self._pinned = []

    def h2d(self, dst: int, src: np.ndarray) -> None:
        self.cp.cuda.runtime.memcpyAsync(dst, src.ctypes.data, src.nbytes, 1, self.stream.ptr)

    def d2h(self, dst: np.ndarray, src: int) -> None:
        self.cp.cuda.runtime.memcpyAsync(dst.ctypes.data, src, dst.nbytes, 2, self.stream.ptr)

    def stream_handle(self) -> int:
        return int(self.stream.ptr)

    def sync(self) -> None:
        self.stream.synchronize()


def _wrap_host(ptr: int, nbytes: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    import ctypes

    buf = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(tuple(shape))


def _cuda_backend() -> Any:
    errors = []
    for cls in (_CudaPython, _CuPy):
        try:
            return cls()
        except ImportError as e:
            errors.append(str(e))
    raise UserError(
        "TensorRT needs a CUDA binding for device buffers: pip install cuda-python "
        "(or cupy-cuda12x); neither is importable here"
    )


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        threads: Optional[int] = None,
        streams: int = 1,
        precision: str = "fp16",
        input_shapes: dict[str, list[int]] | None = None,
        timing: str = "host",
    ) -> None:
        super().__init__()
        try:
            import tensorrt as trt
        except ImportError:
            raise UserError(
                "TensorRT's Python package is not importable here: on a Jetson install JetPack's "
                "python3-libnvinfer (apt install python3-libnvinfer), elsewhere pip install tensorrt"
            ) from None
        self.trt = trt
        self._common(artifact, threads, streams, precision)
        if self.path.suffix.lower() == ".onnx":
            raise UserError(
                f"{self.path.name} is an ONNX file: python -m benchmarks.run_bench builds the engine on the board "
                "from it (or pass a .engine built with trtexec / sglp-edge compile)"
            )
        if timing not in ("host", "compute"):
            raise UserError("TensorRT timing must be 'host' (H2D + compute + D2H) or 'compute'")
        self.timing = timing
        self.cuda = _cuda_backend()
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(
                f"TensorRT could not deserialize {self.path.name}: engines are tied to the TensorRT version "
                "and GPU they were built with; rebuild it on this board"
            )
        self.context = self.engine.create_execution_context()
        declared, self._outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name
            shape = [d if d >= 0 else None for d in self.engine.get_tensor_shape(name)]
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                declared.append(TensorSpec(name, shape, dtype))
            else:
                self._outputs.append((name, dtype))
        self.output_names = [n for n, _ in self._outputs]
        self._declared = self._resolve(declared, input_shapes)
        self._dev: dict[str, int] = {}
        self._host_out: dict[str, np.ndarray] = {}
        self._host_in: dict[str, np.ndarray] = {}
        first = self._declared[0].shape[0] if self._declared and self._declared[0].shape else None
        self.set_batch(first if isinstance(first, int) else 1)

    def _free(self) -> None:
        for p in self._dev.values():
            self.cuda.free(p)
        self._dev.clear()
        self._host_in, self._host_out = {}, {}
        self.cuda.free_pinned()

    def set_batch(self, batch: int) -> None:
        specs = self._with_batch(self._declared, batch)
        for s in specs:
            if not s.is_static():
                raise UserError(f"input {s.name!r} has dynamic dims {s.shape}: give --input-shape {s.name}=1x...")
            decl = self.engine.get_tensor_shape(s.name)
            if any(d >= 0 for d in decl) and -1 not in decl and list(decl) != s.shape:
                raise UnsupportedBatch(f"engine input {s.name} is static {list(decl)}; cannot run batch {batch}")
            if -1 in decl:
                lo, _opt, hi = self.engine.get_tensor_profile_shape(s.name, 0)
                if any(x < a or x > b for x, a, b in zip(s.shape, lo, hi)):
                    raise UnsupportedBatch(
                        f"shape {s.shape} for {s.name} is outside the engine's profile [{list(lo)}, {list(hi)}]"
                    )
                if not self.context.set_input_shape(s.name, tuple(s.shape)):
                    raise UnsupportedBatch(f"TensorRT refused shape {s.shape} for {s.name} (outside its profile)")
        self._free()
        for s in specs:
            nbytes = int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
            self._dev[s.name] = self.cuda.malloc(nbytes)
            self.context.set_tensor_address(s.name, self._dev[s.name])
        # page-locked host buffers for inputs and outputs: pageable numpy memory would make every copy
        # a staged, synchronous one, and host latency incomparable with trtexec's
        self._host_in = {s.name: self.cuda.pinned(s.shape, s.dtype) for s in specs}
        self._host_out = {}
        for name, dtype in self._outputs:
            shape = list(self.context.get_tensor_shape(name))
            out = self.cuda.pinned(shape, dtype)
            self._host_out[name] = out
            self._dev[name] = self.cuda.malloc(out.nbytes)
            self.context.set_tensor_address(name, self._dev[name])
        self.inputs = specs
        self.batch = batch

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle()):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
        self.check_feeds(feeds)
        for s in self.inputs:
            np.copyto(self._host_in[s.name], np.asarray(feeds[s.name]).reshape(self._host_in[s.name].shape),
                      casting="same_kind")
        for name, arr in self._host_in.items():
            self.cuda.h2d(self._dev[name], arr)
        self.cuda.sync()
        if self.timing == "compute":
            return self._enqueue

        def host_call() -> None:
            for name, arr in self._host_in.items():
                self.cuda.h2d(self._dev[name], arr)
            self._enqueue()
            for name, out in self._host_out.items():
                self.cuda.d2h(out, self._dev[name])

        return host_call

    def sync(self) -> None:
        self.cuda.sync()

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        call = self.bind(feeds)
        if self.timing == "compute":
            call()
            for name, out in self._host_out.items():
                self.cuda.d2h(out, self._dev[name])
        else:
            call()
        self.cuda.sync()
        return [self._host_out[n].copy() for n in self.output_names]

    def info(self) -> dict[str, Any]:
        trt = self.trt
        layer_precisions = None
        try:
            insp = self.engine.create_engine_inspector()
            import json as _json

            data = _json.loads(insp.get_engine_information(trt.LayerInformationFormat.JSON))
            precs = {}
            for layer in data.get("Layers", []):
                if isinstance(layer, dict):
                    for t in layer.get("Outputs", []):
                        f = t.get("Format/Datatype", "") if isinstance(t, dict) else ""
                        key = f.split()[0] if f else "?"
                        precs[key] = precs.get(key, 0) + 1
            layer_precisions = precs or None
        except Exception:
            layer_precisions = None
        return {
            "backend": self.backend,
            "runtime": "tensorrt",
            "runtime_version": trt.__version__,
            "cuda_binding": f"{self.cuda.name} {self.cuda.version}",
            "precision_requested": self.precision,
            "precision_used": {"io": {n: d for n, d in self._outputs}, "layer_output_formats": layer_precisions},
            "threads_requested": self.threads,
            "streams_requested": self.streams,
            "streams_used": 1,
            "host_buffers": "pinned (page-locked)",
            "timing": "host latency: H2D + execute_async_v3 + D2H, stream synchronised before each clock read"
            if self.timing == "host" else "compute only: execute_async_v3, stream synchronised before each clock read",
        }

    def close(self) -> None:
        try:
            self._free()
        except Exception:
            pass


# ============================================================================================


def guess_backend(path: str | os.PathLike) -> str:
    s = Path(path).suffix.lower()
    if s == ".xml":
        return "openvino"
    if s in (".engine", ".plan", ".trt"):
        return "tensorrt"
    if s in (".onnx", ".ort"):
        return "onnxruntime"
    raise UserError(f"cannot tell the backend from {Path(path).name!r}: pass --backend openvino|onnxruntime|tensorrt")


def open_runner(
    backend: str,
    artifact: str | os.PathLike,
    *,
    threads: Optional[int] = None,
    streams: int = 1,
    precision: str = "fp32",
    device: str = "CPU",
    providers: Sequence[str] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    trt_timing: str = "host",
) -> Runner:
    """Open ``artifact`` with ``backend``; every problem the user can fix is a UserError."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    if streams < 1:
        raise UserError(f"streams must be >= 1, got {streams}")
    if backend == "openvino":
        return OpenVINORunner(artifact, threads=threads, streams=streams, precision=precision, device=device,
                              input_shapes=input_shapes)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(artifact, threads=threads, streams=streams, precision=precision,
                                 providers=providers, input_shapes=input_shapes)
    return TensorRTRunner(artifact, threads=threads, streams=streams, precision=precision,
                          input_shapes=input_shapes, timing=trt_timing)
