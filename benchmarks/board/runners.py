"""The choice of on-device runner: :func:`open_runner` (numpy + the chosen backend's runtime; no torch).

The interface all runners share (:class:`~benchmarks.board.runner_base.Runner`, ``TensorSpec``,
``UnsupportedBatch``, ``parse_shape``, ``artifact_files``, ``random_feeds``) is in
:mod:`benchmarks.board.runner_base`. Each backend's runner is one module, named by the backend
registry (:mod:`benchmarks.board.backends`, ``runner``) and imported only when its backend is opened,
so a runtime package is imported only when its backend is used:

* ``openvino``    -- :mod:`benchmarks.board.runner_openvino`: ``openvino.Core().compile_model`` of an IR
  (``.xml`` + ``.bin``) or ONNX file, with ``PERFORMANCE_HINT``, ``INFERENCE_NUM_THREADS``,
  ``NUM_STREAMS`` and ``INFERENCE_PRECISION_HINT`` set explicitly and read back from the compiled model.
* ``onnxruntime`` -- :mod:`benchmarks.board.runner_onnxruntime`: ``onnxruntime.InferenceSession`` with
  ``intra_op_num_threads`` fixed, ``inter_op_num_threads = 1``, sequential execution, chosen execution
  providers (CPU by default; XNNPACK/ACL on ARM where the ORT build has them).
* ``tensorrt``    -- :mod:`benchmarks.board.runner_tensorrt`: a serialized engine (``.engine``/``.plan``)
  run with TensorRT 10/11 ``execute_async_v3`` on a CUDA stream; device buffers through ``cuda-python``
  or ``cupy``. Timed calls include host->device copy, execution and device->host copy ("host
  latency", what an application sees); the stream is synchronised before every clock read.

A runner module holds ``RUNNER``, its :class:`Runner` subclass, whose ``options`` name the
backend-specific arguments of :func:`open_runner` it takes (``device``, ``providers``, ``timing``).
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

from benchmarks.board.backends import BACKENDS, NAMES
from benchmarks.board.errors import UserError
from benchmarks.board.runner_base import Runner


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
        raise UserError(f"backend must be one of {', '.join(NAMES)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    if streams < 1:
        raise UserError(f"streams must be >= 1, got {streams}")
    spec = BACKENDS[backend]
    if not spec.runner:
        raise UserError(f"backend {backend} has no model runner ({', '.join(spec.tasks)} only); "
                        f"use one of {', '.join(n for n, b in BACKENDS.items() if b.runner)}")
    cls = importlib.import_module(spec.runner).RUNNER  # heavy: the runner imports its runtime when opened
    extra = {"device": device, "providers": providers, "timing": trt_timing}
    return cls(artifact, threads=threads, streams=streams, precision=precision, input_shapes=input_shapes,
               **{k: extra[k] for k in cls.options})
