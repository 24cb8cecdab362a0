"""Device profiles: where a model must run and what it must achieve there.

A profile is one YAML file ``devices/<name>.yaml``. **Design choice: one profile = one backend.**
A profile names exactly one runtime (``openvino`` | ``onnxruntime`` | ``tensorrt``) with its
precision, threads/streams and input shapes, plus the constraints the deployed artifact must meet
on that runtime. A board that can run two runtimes gets two profiles (``local-cpu-ort`` and
``local-cpu-openvino``); a profile may ``extends:`` another one and override fields (mappings are
merged key by key, lists such as ``constraints`` are replaced whole), which is how
``local-cpu.yaml`` is this machine's default (``extends: local-cpu-ort``). One backend per profile
keeps every result unambiguous: one artifact, one runtime, one verdict per constraint.

Fields (see ``devices/local-cpu-ort.yaml`` for an annotated example)::

    name: local-cpu-ort            # must equal the file name without .yaml (default: the file name)
    description: ...
    arch: x86_64 | aarch64
    backend: openvino | onnxruntime | tensorrt
    precision: fp32 | fp16 | bf16 | int8
    threads: 2                     # inference threads, fixed and recorded (null = runtime default)
    streams: 1                     # OpenVINO streams
    device: CPU                    # OpenVINO device
    providers: [CPUExecutionProvider]   # ONNX Runtime only
    inputs: [{name: x, shape: [1, 3, 32, 32], dtype: float32}]   # name optional for one input
    bench: {warmup_s: 0.2, min_iters: 10, min_duration_s: 3, batch_sizes: [1, 8], power: auto}
    constraints:
      - {metric: latency_p90_ms, op: "<=", limit: 10}
      - "accuracy_drop_pct <= 1.5"            # short form, same meaning
    ssh: {host: user@board, port: 22, identity: ~/.ssh/id_ed25519, known_hosts: ..., python: python3}

Metrics: ``latency_p50_ms``, ``latency_p90_ms``, ``latency_p99_ms`` (at the primary batch),
``accuracy_drop_pct`` (points of top-1 below the unpruned model), ``ppl_increase_pct`` (percent
perplexity increase over the unpruned model), ``model_size_mb``, ``peak_memory_mb`` (peak RSS of the
benchmark process; MB = MiB), ``energy_mj`` (per inference, Jetson tegrastats).

Where profiles are found: the folders in ``$SGLP_EDGE_DEVICES`` (``os.pathsep``-separated; searched
first, so a user's profile can shadow a built-in one), then ``devices/`` at the repository root,
then ``sglp_edge/assets/devices`` inside an installed package.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from exporters.errors import UserError
from exporters.registry import BACKENDS as _REGISTRY

ENV_VAR = "SGLP_EDGE_DEVICES"

Metric = Literal[
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "accuracy_drop_pct",
    "ppl_increase_pct",
    "model_size_mb",
    "peak_memory_mb",
    "energy_mj",
    # decoder LMs (task causal-lm, benchmarks/lm_bench.py)
    "decode_tokens_per_s",
    "ttft_ms",
    "perplexity_increase_pct",
    "greedy_agreement_pct",
]
METRICS: tuple[str, ...] = Metric.__args__  # type: ignore[attr-defined]
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
Task = Literal["image-classification", "causal-lm"]

#: artifact suffixes each backend can run (from the backend registry, exporters/registry.py)
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
        if v is not None and (not v or v.startswith("-") or any(c.isspace() for c in v)):
            raise ValueError(f"host must look like user@board (no spaces, not starting with '-'), got {v!r}")
        return v

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
    task: Task = "image-classification"  # causal-lm: benchmarks/lm_bench.py (TTFT, tokens/s, perplexity)
    backend: str  # a name in the backend registry (exporters/registry.py)
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
        allowed = _REGISTRY[self.backend].run_precisions
        if self.precision not in allowed:
            raise ValueError(f"precision {self.precision} is not available on {self.backend}: use {', '.join(allowed)}")
        if self.providers is not None and self.backend != "onnxruntime":
            raise ValueError("providers: only applies to backend onnxruntime")
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
        suffix = Path(artifact).suffix.lower()
        ok = BACKEND_SUFFIXES[self.backend]
        if suffix not in ok:
            raise UserError(
                f"profile {self.name} runs {self.backend}, which takes {'/'.join(ok)} files, not {Path(artifact).name!r}"
            )

    def run_bench_args(self, *, artifact: str, out: str, data: Optional[str] = None,
                       overrides: Optional[dict[str, Any]] = None) -> list[str]:
        """Arguments for ``python -m benchmarks.run_bench`` (a list: quote each element remotely)."""
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


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def profile_dirs() -> list[Path]:
    """Folders searched for ``<name>.yaml``, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    here = Path(__file__).resolve()
    for d in (here.parents[1] / "devices", here.parent / "assets" / "devices"):
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return dirs


def list_profiles() -> list[str]:
    """Names of every profile found (first folder wins for duplicate names), sorted."""
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_profile(name_or_path: str | os.PathLike) -> Path:
    s = str(name_or_path)
    p = Path(s).expanduser()
    if s.endswith((".yaml", ".yml")) or os.sep in s or (os.altsep and os.altsep in s):
        if not p.is_file():
            raise UserError(f"device profile file not found: {p}")
        return p
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s):
        raise UserError(f"bad profile name {s!r}: use the file name without .yaml, e.g. local-cpu")
    for d in profile_dirs():
        for ext in (".yaml", ".yml"):
            cand = d / f"{s}{ext}"
            if cand.is_file():
                return cand
    known = ", ".join(list_profiles()) or "none"
    raise UserError(
        f"no device profile named {s!r} (known: {known}); add devices/{s}.yaml or a folder in ${ENV_VAR}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where} not valid YAML ({problem})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if doc is None:
        raise UserError(f"{path} is empty: a profile needs at least arch and backend")
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a profile must be a mapping of fields, got {type(doc).__name__}")
    return doc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_error(path: Path, err: ValidationError) -> str:
    errs = err.errors()
    e = errs[0]
    loc = ""
    for part in e.get("loc", ()):
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = e.get("msg", "invalid").replace("\n", " ")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if e.get("type") == "extra_forbidden":
        msg = "unknown field (check its spelling; see sglp_edge/profiles.py for the fields)"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{path}: {loc or 'profile'}: {msg}{more}"


def _raw(path: Path, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    doc = _read_yaml(path)
    parent = doc.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise UserError(f"{path}: extends: must be a profile name")
        sibling = path.parent / f"{parent}.yaml"  # a sibling file first, then the search path
        ppath = sibling if sibling.is_file() and sibling.resolve() != path.resolve() else find_profile(parent)
        key = str(ppath.resolve())
        if key in chain:
            raise UserError(f"{path}: extends: {parent} makes a cycle ({' -> '.join(Path(c).stem for c in chain)})")
        base = _raw(ppath, chain + (key,))
        base.pop("name", None)  # a child never inherits its parent's name
        doc = _merge(base, doc)
        doc["extends"] = parent
    return doc


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """Load and validate ``devices/<name>.yaml`` (or a path). Invalid files raise a one-line
    :class:`UserError` naming the file and the field."""
    path = find_profile(name_or_path)
    doc = _raw(path, (str(path.resolve()),))
    doc.setdefault("name", path.stem)
    if doc.get("name") != path.stem:
        raise UserError(f"{path}: name: is {doc.get('name')!r} but the file is {path.name}; make them match")
    try:
        prof = DeviceProfile.model_validate(doc)
    except ValidationError as e:
        raise UserError(_format_error(path, e)) from None
    prof.source = str(path)
    return prof


def python_argv(python: str) -> list[str]:
    """The remote interpreter setting as an argument list (it may be a command line)."""
    try:
        parts = shlex.split(python)
    except ValueError as e:
        raise UserError(f"remote python {python!r} is not a valid command line: {e}") from None
    if not parts:
        raise UserError("remote python must not be empty")
    return parts
