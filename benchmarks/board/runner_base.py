"""The interface every on-device runner shares (numpy only; no runtime, no torch).

:class:`Runner` (one subclass per backend, in ``runner_<backend>.py``; opened through
:func:`benchmarks.board.runners.open_runner`):

* ``inputs``            -> list of :class:`TensorSpec` (name, shape at the current batch, dtype)
* ``set_batch(b)``      -> reshape/recompile for batch ``b``; raises :class:`UnsupportedBatch`
* ``bind(feeds)``       -> a no-argument callable running one inference on those inputs
* ``sync()``            -> block until queued device work is done (no-op for CPU runtimes)
* ``infer(feeds)``      -> outputs as numpy arrays (host memory)
* ``info()``            -> what was actually used: runtime version, threads, streams, precision

plus the helpers every backend and the harness use: :func:`parse_shape`, :func:`artifact_files`,
:func:`random_feeds`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks.board.errors import UserError

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
    options: Sequence[str] = ()  # the backend-specific arguments of open_runner it takes (device, providers, timing)

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
