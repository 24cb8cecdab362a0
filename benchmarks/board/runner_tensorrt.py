"""TensorRT runner for the on-device benchmark (numpy + ``tensorrt`` + a CUDA binding; no torch).

A serialized engine (``.engine``/``.plan``) run with TensorRT 10/11 ``execute_async_v3`` on a CUDA
stream; device buffers through ``cuda-python`` (``cuda.bindings.runtime``, or the older
``cuda.cudart``) or ``cupy``, whichever is installed. All imports are lazy; a missing package is a
:class:`~benchmarks.board.errors.UserError` naming what to install. Timed calls include host->device copy,
execution and device->host copy ("host latency", what an application sees); the stream is
synchronised before every clock read. The shared interface is :class:`benchmarks.board.runner_base.Runner`;
open it through :func:`benchmarks.board.runners.open_runner`.
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks.board.errors import UserError
from benchmarks.board.runner_base import Runner, TensorSpec, UnsupportedBatch


class _CudaPython:
    """Device memory and streams through NVIDIA's cuda-python (``cuda.bindings.runtime``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6  # heavy: cuda-python
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python  # heavy: cuda-python
        self.rt = cudart
        self._pinned: list = []
        self.stream = self._ok(cudart.cudaStreamCreate())
        try:
            import cuda as _c  # heavy: cuda-python

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
        return wrap_host(ptr, n, shape, dt)

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
        import cupy as cp  # heavy: cupy

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


def wrap_host(ptr: int, nbytes: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
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
    options = ("timing",)

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
            import tensorrt as trt  # heavy: tensorrt
        except ImportError:
            raise UserError(
                "TensorRT's Python package is not importable here: on a Jetson install JetPack's "
                "python3-libnvinfer (apt install python3-libnvinfer), elsewhere pip install tensorrt"
            ) from None
        self.trt = trt
        self._common(artifact, threads, streams, precision)
        if self.path.suffix.lower() == ".onnx":
            raise UserError(
                f"{self.path.name} is an ONNX file: python -m benchmarks.board.run_bench builds the engine on the board "
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
            data = json.loads(insp.get_engine_information(trt.LayerInformationFormat.JSON))
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


#: what benchmarks.board.runners.open_runner opens (the backend registry names this module)
RUNNER = TensorRTRunner
