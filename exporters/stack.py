"""What every backend's compile step shares: the request it receives and the runner stack its
parity goes through (the on-device harness's own runners, benchmarks/board/runners.py: one stack).
No torch; Python 3.8 compatible."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks.board.calib import CalibData, batches
from benchmarks.board.runners import open_runner


@dataclass
class CompileRequest:
    """Everything ``compile_model`` hands a backend's ``compile_step(req)``; the step writes its
    artifacts into ``out`` and returns ``(section, parity runner or None, measured_on note or None)``."""

    onnx_path: Path
    out: Path
    precision: str
    io: dict
    calib: Optional[CalibData] = None
    eval_data: Optional[CalibData] = None
    max_accuracy_drop: Optional[float] = None
    calib_samples: int = 300
    device: str = "CPU"
    providers: Optional[Sequence[str]] = None
    trt_version: Optional[str] = None
    trtexec_only: bool = False
    trt_options: Any = None
    keep_first_last_float: bool = True
    int8_scheme: str = "auto"
    want_runner: bool = True
    say: Callable[[str], None] = lambda m: None


def stack_runner(backend: str, artifact: str | Path, precision: str, *, device: str = "CPU",
                 providers: Sequence[str] | None = None, max_batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """``f(x) -> first output`` through the on-device harness's own runners (benchmarks/board/runners.py):
    compile-time parity and the board measure with one stack. Batches never exceed ``max_batch``
    (for TensorRT: the engine profile's maximum)."""

    state: dict[str, Any] = {}

    def one(b: np.ndarray) -> np.ndarray:
        r = state.get("r")
        if r is not None and list(r.inputs[0].shape[1:]) != list(b.shape[1:]):
            r.close()
            r = None
        if r is None:
            r = state["r"] = open_runner(backend, str(artifact), precision=precision, device=device,
                                         providers=providers, input_shapes={"": list(b.shape)})
        if r.inputs[0].shape[0] != b.shape[0]:
            r.set_batch(int(b.shape[0]))
        return np.asarray(r.infer({r.inputs[0].name: b})[0])

    return lambda x: np.concatenate([one(b) for b in batches(x, max_batch)], 0)
