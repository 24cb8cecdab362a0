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
perplexity increase over the unpruned model), for decoder LMs ``decode_tokens_per_s``, ``ttft_ms``,
``perplexity_increase_pct`` (pruned vs unpruned on the same runtime), ``perplexity_vs_pytorch_pct``
(the artifact vs the same model in PyTorch FP32) and ``greedy_agreement_pct``, ``model_size_mb``, ``peak_memory_mb`` (peak RSS of the
benchmark process; MB = MiB), ``energy_mj`` (per inference, Jetson tegrastats).

Where profiles are found: the folders in ``$SGLP_EDGE_DEVICES`` (``os.pathsep``-separated; searched
first, so a user's profile can shadow a built-in one), then ``devices/`` at the repository root,
then ``sglp_edge/assets/devices`` inside an installed package.

The pydantic models of these fields, the metric names and the constraint check are in
:mod:`sglp_edge.profiles.schema` (import them from there).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from benchmarks.board.errors import UserError

from sglp_edge.profiles.schema import DeviceProfile

ENV_VAR = "SGLP_EDGE_DEVICES"


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def profile_dirs() -> list[Path]:
    """Folders searched for ``<name>.yaml``, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    here = Path(__file__).resolve()
    for d in (here.parents[2] / "devices", here.parents[1] / "assets" / "devices"):
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
        if p.is_dir():
            raise UserError(f"device profile {p} is a folder, give a file (a profile YAML)")
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
        msg = "unknown field (check its spelling; see sglp_edge/profiles/load.py for the fields)"
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
