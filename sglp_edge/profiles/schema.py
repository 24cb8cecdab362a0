"""The device-profile schema (:mod:`sglp_edge.profiles.load` finds, reads and merges the YAML files and
documents the fields): the pydantic models of a profile, its benchmark settings, input shapes, SSH
defaults and constraints, the metric names a constraint may use, and the check of measured metrics
against a profile's constraints."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from benchmarks.board.errors import UserError
from benchmarks.board.backends import BACKENDS as _REGISTRY

from sglp_edge.validate import check_host, check_threads, field_check

Metric = Literal[
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "accuracy_drop_pct",
    "ppl_increase_pct",
    "model_size_mb",
    "peak_memory_mb",
    "energy_mj",
    # decoder LMs (task causal-lm, benchmarks/board/lm_bench.py)
    "decode_tokens_per_s",
    "ttft_ms",
    "perplexity_increase_pct",
    "perplexity_vs_pytorch_pct",
    "greedy_agreement_pct",
]
METRICS: tuple[str, ...] = Metric.__args__  # type: ignore[attr-defined]
#: metrics that are never negative (a drop or an increase may be: the pruned model can do better),
#: those always above 0 (a time, a size) and those that are a share of 100
NON_NEGATIVE = frozenset({"latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "model_size_mb", "peak_memory_mb",
                          "energy_mj", "decode_tokens_per_s", "ttft_ms", "greedy_agreement_pct"})
POSITIVE = frozenset({"latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "model_size_mb", "peak_memory_mb",
                      "ttft_ms"})
PERCENT_OF_100 = frozenset({"greedy_agreement_pct"})
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
Task = Literal["image-classification", "causal-lm"]

#: artifact suffixes each backend can run (from the backend registry, benchmarks/board/backends.py)
BACKEND_SUFFIXES = {n: b.suffixes for n, b in _REGISTRY.items()}

_SHORT = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Constraint(_Strict):
    metric: Metric
    op: Literal["<=", ">="] = "<="
    limit: float

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _SHORT.match(v)
            if not m:
                raise ValueError(f"write a constraint as 'metric <= limit' or 'metric >= limit', got {v!r}")
            return {"metric": m.group(1), "op": m.group(2), "limit": float(m.group(3))}
        return v

    @model_validator(mode="after")
    def _can_be_met(self) -> "Constraint":
        if self.metric in NON_NEGATIVE and self.limit < 0:
            never = "can never be met" if self.op == "<=" else "always holds"
            raise ValueError(f"{self.metric} cannot be negative, so {self} {never}; give a limit >= 0")
        if self.metric in POSITIVE and self.op == "<=" and self.limit == 0:
            raise ValueError(f"{self.metric} is always above 0, so {self} can never be met; give a limit > 0")
        if self.metric in PERCENT_OF_100 and self.limit > 100:
            raise ValueError(f"{self.metric} is at most 100, so {self} can never be met; give a limit <= 100")
        return self

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.limit:g}"


class InputSpec(_Strict):
    name: Optional[str] = None
    shape: list[PositiveInt] = Field(min_length=1)
    dtype: str = "float32"


class BenchSettings(_Strict):
    warmup_s: float = Field(0.2, ge=0)
    min_iters: PositiveInt = 10
    min_duration_s: float = Field(3.0, ge=0)
    max_iters: Optional[PositiveInt] = None
    max_duration_s: Optional[float] = Field(None, gt=0)
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    eval_batch: Optional[PositiveInt] = None
    max_eval: Optional[PositiveInt] = None
    power: Literal["auto", "on", "off"] = "auto"
    tegrastats_interval_ms: PositiveInt = 100

    @field_validator("power", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _caps(self) -> "BenchSettings":
        if self.max_iters is not None and self.max_iters < self.min_iters:
            raise ValueError("max_iters must be >= min_iters")
        if self.max_duration_s is not None and self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must be >= min_duration_s")
        return self


class BenchOverrides(_Strict):
    """A run config's ``bench:`` section: overrides of the profiles' :class:`BenchSettings`, each
    checked with the same ranges (plus ``threads``) when the config is read."""

    threads: Optional[int] = None
    warmup_s: Optional[float] = Field(None, ge=0)
    min_iters: Optional[PositiveInt] = None
    min_duration_s: Optional[float] = Field(None, ge=0)  # 0: min_iters alone decides
    max_iters: Optional[PositiveInt] = None
    max_duration_s: Optional[float] = Field(None, gt=0)
    batch_sizes: Optional[list[PositiveInt]] = Field(None, min_length=1)
    eval_batch: Optional[PositiveInt] = None
    max_eval: Optional[PositiveInt] = None
    power: Optional[Literal["auto", "on", "off"]] = None
    tegrastats_interval_ms: Optional[PositiveInt] = None

    _yaml_bool = field_validator("power", mode="before")(BenchSettings._yaml_bool.__func__)

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: Optional[int]) -> Optional[int]:
        return field_check(check_threads, "threads", v)


class SSHDefaults(_Strict):
    host: Optional[str] = None  # [user@]host
    port: int = Field(22, ge=1, le=65535)
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    python: str = "python3"  # remote interpreter (a command line: "conda run -n edge python" works)
    remote_dir: str = "/tmp"  # parent of the per-run temporary folder on the board
    connect_timeout_s: PositiveInt = 10
    timeout_s: PositiveInt = 1800  # whole run on the board
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("host")
    @classmethod
    def _host(cls, v: Optional[str]) -> Optional[str]:
        return field_check(check_host, "host", v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"environment variable name {k!r} is not valid")
        return v


class DeviceProfile(_Strict):
    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    task: Task = "image-classification"  # causal-lm: benchmarks/board/lm_bench.py (TTFT, tokens/s, perplexity)
    backend: str  # a name in the backend registry (benchmarks/board/backends.py)
    precision: Precision = "fp32"
    threads: Optional[PositiveInt] = None
    streams: PositiveInt = 1
    device: str = "CPU"
    providers: Optional[list[str]] = None
    inputs: list[InputSpec] = Field(default_factory=list)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    constraints: list[Constraint] = Field(default_factory=list)
    ssh: Optional[SSHDefaults] = None
    emulate: Optional[Literal["qemu-aarch64"]] = None  # run on the emulated ARM board unless a host is given
    extends: Optional[str] = None
    source: Optional[str] = Field(None, exclude=True)  # file it was loaded from (set by the loader)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in _REGISTRY:
            raise ValueError(f"unknown backend {v!r}: use one of {', '.join(_REGISTRY)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DeviceProfile":
        be = _REGISTRY[self.backend]
        if self.task not in be.tasks:  # an LM-only runtime (onnxruntime-genai) on an image profile
            raise ValueError(f"backend {self.backend} runs {' / '.join(be.tasks)} only; this profile is task "
                             f"{self.task} (use onnxruntime or openvino, or set task: causal-lm)")
        allowed = be.run_precisions
        if self.precision not in allowed:
            raise ValueError(f"precision {self.precision} is not available on {self.backend}: use {', '.join(allowed)}")
        if self.providers is not None and not be.providers:
            raise ValueError(f"providers: only applies to backend {' / '.join(n for n, b in _REGISTRY.items() if b.providers)}")
        if self.emulate and self.arch != "aarch64":
            raise ValueError(f"emulate: {self.emulate} runs aarch64 boards; this profile is {self.arch}")
        if len(self.inputs) > 1 and any(i.name is None for i in self.inputs):
            raise ValueError("inputs: with several inputs every one needs a name")
        seen = set()
        for c in self.constraints:
            key = (c.metric, c.op)
            if key in seen:
                raise ValueError(f"constraints: {c.metric} {c.op} is given twice")
            seen.add(key)
        return self

    # -- helpers used by the bench command -------------------------------------------------------
    def check_artifact(self, artifact: str | os.PathLike) -> None:
        be = _REGISTRY[self.backend]
        if be.folder_artifact:
            if not (Path(artifact) / be.artifact).is_file():
                raise UserError(f"profile {self.name} runs {self.backend}, which takes a folder holding "
                                f"{be.artifact}, not {Path(artifact).name!r}")
            return
        suffix = Path(artifact).suffix.lower()
        ok = BACKEND_SUFFIXES[self.backend]
        if suffix not in ok:
            raise UserError(
                f"profile {self.name} runs {self.backend}, which takes {'/'.join(ok)} files, not {Path(artifact).name!r}"
            )

    def run_bench_args(self, *, artifact: str, out: str, data: Optional[str] = None,
                       overrides: Optional[dict[str, Any]] = None) -> list[str]:
        """Arguments for ``python -m benchmarks.board.run_bench`` (a list: quote each element remotely)."""
        b = self.bench.model_copy(update={k: v for k, v in (overrides or {}).items()
                                          if k in BenchSettings.model_fields and v is not None})
        args = ["--artifact", artifact, "--backend", self.backend, "--out", out, "--precision", self.precision,
                "--streams", str(self.streams), "--device", self.device,
                "--batch-sizes", ",".join(str(x) for x in b.batch_sizes),
                "--warmup-s", repr(float(b.warmup_s)), "--min-iters", str(b.min_iters),
                "--min-duration-s", repr(float(b.min_duration_s)), "--power", b.power,
                "--tegrastats-interval-ms", str(b.tegrastats_interval_ms)]
        if self.task != "image-classification":
            args += ["--task", self.task]
        threads = (overrides or {}).get("threads") or self.threads
        if threads:
            args += ["--threads", str(threads)]
        if b.max_iters:
            args += ["--max-iters", str(b.max_iters)]
        if b.max_duration_s:
            args += ["--max-duration-s", repr(float(b.max_duration_s))]
        if self.providers:
            args += ["--providers", ",".join(self.providers)]
        for spec in self.inputs:
            dims = "x".join(str(d) for d in spec.shape)
            args += ["--input-shape", f"{spec.name}={dims}" if spec.name else dims]
        if data:
            args += ["--data", data]
            if b.eval_batch:
                args += ["--eval-batch", str(b.eval_batch)]
            if b.max_eval:
                args += ["--max-eval", str(b.max_eval)]
        return args


class ConstraintResult(BaseModel):
    metric: str
    op: str
    limit: float
    measured: Optional[float]
    passed: Optional[bool]  # None = not measured (never a silent pass)
    note: str = ""

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else ("not measured" if self.passed is None else "FAIL")


def evaluate_constraints(profile: DeviceProfile, measured: dict[str, Any]) -> list[ConstraintResult]:
    """Check every constraint of ``profile`` against ``measured`` (metric -> value). A metric that
    is missing or None yields ``passed=None`` with note "not measured"."""
    out = []
    for c in profile.constraints:
        v = measured.get(c.metric)
        if v is None or (isinstance(v, float) and v != v):  # missing or NaN
            out.append(ConstraintResult(metric=c.metric, op=c.op, limit=c.limit, measured=None, passed=None,
                                        note="not measured"))
            continue
        v = float(v)
        ok = v <= c.limit if c.op == "<=" else v >= c.limit
        out.append(ConstraintResult(metric=c.metric, op=c.op, limit=c.limit, measured=v, passed=ok))
    return out
