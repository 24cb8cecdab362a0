"""A per-target latency model for depth pruning: what each removable unit costs on the device.

Measured on the target itself, through the same :class:`~sglp_edge.targets.base.Target` interface
(and so the same on-device harness, backend, precision, threads and primary batch) as every
benchmark. The method is cheap and honest:

* units with the same signature (module type, parameter count, MACs) cost the same on a CPU or a
  GPU, so they share one cost (ResNet-56: three groups, one per stage) -- a generic model whose
  units all differ gets one cost per unit;
* the full model and networks with random subsets of units removed are exported, compiled with
  the real backend, and timed in alternating rounds (a shuffled order each round, so drift and
  load spread over every network alike); each network's figure is the median of its rounds' p90;
* an additive model ``p90 = constant + sum(cost of each kept unit)`` is fitted by non-negative
  least squares, then validated on further random subsets that took no part in the fit: the
  report gives each one's predicted against measured p90 and the relative error.

Candidates measured later (:mod:`sglp_edge.budget.search`) are *anchored* to this model: each is
timed in alternating rounds with the unpruned network (``time_artifacts(..., reference=...)``) and
its p90 is expressed as ``ratio x`` :meth:`LatencyModel.full_p90_ms`. On a stable board the factor
between then and now is ~1 and changes nothing; on a shared machine whose speed drifts by tens of
per cent over minutes it expresses every candidate at the speed the model was measured at, so
predictions, budget and measurements stay comparable.

The result is cached as JSON under ``~/.cache/sglp-edge/latency/`` (``SGLP_EDGE_CACHE`` moves it),
keyed by the model's weights, the device profile, backend, precision, threads, the runtime's
version and where it ran.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import UserError
from exporters.compile import compile_model

from sglp_edge.budget.cache import cache_file, load_cached, save_cached
from sglp_edge.export.onnx_export import export_onnx
from sglp_edge.models.base import get_module
from sglp_edge.sglp.prune import count_macs
from sglp_edge.targets.base import BenchJob

#: bumped when the measuring design changes (old cache entries then stop matching)
METHOD_VERSION = "subsets-nnls-1"
#: bench settings of one timed pass of one network (a shuffled round visits every network once)
FAST_BENCH = {"warmup_s": 0.2, "min_iters": 30, "min_duration_s": 0.5}
#: timed passes per candidate network (the median of their p90s): one pass of a ~1 ms network on a
#: 2-core machine moved by 15-25 % between passes, the median of 3 alternating ones by 2 % (measured)
CANDIDATE_ROUNDS = 3


@dataclass
class LatencyModel:
    """``p90_ms = constant_ms + sum(unit_costs_ms[u] for u in kept removable units)``."""

    constant_ms: float
    unit_costs_ms: dict[str, float]
    groups: list[list[str]]
    key: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)  # every timed network (fit and validation)
    validation: dict[str, Any] = field(default_factory=dict)
    fit_residual_rel: float = 0.0
    measure_s: float = 0.0
    cached: bool = False

    def predict(self, removed: Sequence[str]) -> float:
        gone = set(removed)
        return self.constant_ms + sum(c for u, c in self.unit_costs_ms.items() if u not in gone)

    def full_p90_ms(self) -> float:
        """The anchor: the unpruned network's p90 as measured among the model's own alternating
        rounds (the figure a budget set as a fraction of the unpruned p90 rests on); the fit's
        prediction for it where no such point was kept."""
        full = next((p for p in self.points if not p.get("removed")), None)
        return float(full["measured_p90_ms"]) if full else self.predict([])

    def smallest_ms(self) -> float:
        """The prediction with every removable unit gone: a floor no buildable network goes below."""
        return self.constant_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyModel":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---- keys and cache ---------------------------------------------------------------------------
def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def runtime_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def cache_key(model: torch.nn.Module, profile: Any, where: str, overrides: dict[str, Any]) -> dict[str, Any]:
    be = get_backend(profile.backend)
    prof = json.dumps(profile.model_dump(mode="json"), sort_keys=True)
    return {"weights": weights_hash(model), "profile": profile.name,
            "profile_sha": hashlib.sha256(prof.encode()).hexdigest()[:12], "backend": profile.backend,
            "precision": profile.precision, "threads": profile.threads, "batch": profile.bench.batch_sizes[0],
            "runtime": f"{be.runtime_dist}=={runtime_version(be.runtime_dist)}", "where": where,
            "bench": dict(sorted(overrides.items())), "method": METHOD_VERSION}


# ---- measuring ----------------------------------------------------------------------------------
def unit_groups(model: torch.nn.Module, adapter: Any, units: Sequence[Any], example: torch.Tensor) -> list[list[str]]:
    """Removable units grouped by signature (module type, parameters, MACs): equal units cost the same."""
    _, macs = count_macs(model, adapter, (example, torch.zeros(1, dtype=torch.long)), units)
    groups: dict[tuple, list[str]] = {}
    for u in units:
        if u.removable:
            mod = get_module(model, u.name)
            sig = (type(mod).__name__, sum(p.numel() for p in mod.parameters()), macs.get(u.name, 0))
            groups.setdefault(sig, []).append(u.name)
    return list(groups.values())


def build_artifact(model: torch.nn.Module, example: torch.Tensor, profile: Any, out: Path, *, opset: Optional[int],
                   simplify: str, calib: Optional[Path] = None) -> Path:
    """Export ``model`` to ONNX and compile it for the profile's backend and precision; returns
    the file the on-device harness runs."""
    be = get_backend(profile.backend)
    if be.builds_on == "board":
        raise UserError(f"{profile.name}: a latency budget needs the {profile.backend} artifact timed on the board, "
                        "which is built there; budgets are available for host-built backends (onnxruntime, openvino)")
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, example, out / "model.onnx", kind="image", opset=opset, simplify=simplify, progress=False)
    compile_model(out / "model.onnx", profile.backend, profile.precision, out / "compiled", calib=calib,
                  progress=False, providers=profile.providers or None, device=profile.device)
    return out / "compiled" / be.artifact


def time_artifacts(target: Any, profile: Any, artifacts: dict[str, Path], work: Path, *, rounds: int,
                   overrides: dict[str, Any], seed: int = 0, reference: Optional[Path] = None,
                   log: Optional[Callable[[str], None]] = None) -> dict[str, dict]:
    """Time every artifact ``rounds`` times in alternating, shuffled rounds on ``target``; per
    artifact the median over rounds of each round's p90 (and every round's figures).

    With ``reference`` (the unpruned network's artifact) every round times it too, in the same
    shuffled order, and each artifact's result adds ``ratio``: the median over rounds of its p90
    divided by the reference's p90 in the same round (with the per-round ratios and the
    reference's raw p90s). A machine whose speed drifts moves both alike, so the ratio holds
    where the milliseconds do not."""
    ref = "__reference__"
    if reference is not None and ref in artifacts:
        raise UserError(f"an artifact may not be named {ref}")
    arts = {**artifacts, **({ref: reference} if reference is not None else {})}
    rng = random.Random(seed)
    per: dict[str, list[float]] = {n: [] for n in arts}
    p50: dict[str, list[float]] = {n: [] for n in arts}
    names = list(arts)
    ov = {**overrides, "batch_sizes": [profile.bench.batch_sizes[0]]}
    for r in range(rounds):
        rng.shuffle(names)
        for i, n in enumerate(names):
            run = target.bench(BenchJob(artifact=arts[n], data=None, profile=profile, out_dir=work / f"r{r}-{n}",
                                        overrides=ov, label=f"latency:{n}"))
            if not run.ok:
                raise UserError(f"timing {n} on {target.label or profile.name} failed: {run.error} (logs in {work})")
            m = (run.result or {}).get("metrics", {})
            per[n].append(float(m["latency_p90_ms"]))
            p50[n].append(float(m.get("latency_p50_ms", float("nan"))))
            if log:
                log(f"latency round {r + 1}/{rounds}, network {i + 1}/{len(names)}: {n} p90 {per[n][-1]:.3f} ms")
    out = {n: {"p90_ms": float(np.median(per[n])), "rounds_p90_ms": per[n], "rounds_p50_ms": p50[n]} for n in artifacts}
    if reference is not None:
        for n in artifacts:
            ratios = [a / b for a, b in zip(per[n], per[ref])]
            out[n].update(ratio=float(np.median(ratios)), rounds_ratio=ratios, reference_p90_ms=float(np.median(per[ref])),
                          reference_rounds_p90_ms=per[ref])
    return out


def subset_design(groups: list[list[str]], n_fit: int, n_val: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Removal sets: the full model, each group entirely removed, then random mixes for the fit;
    uniformly random subsets (none of them in the fit) for validation."""
    rng = random.Random(seed)
    fit: list[list[str]] = [[]]
    if len(groups) > 1:
        fit += [list(g) for g in groups]
    seen = {tuple()} | {tuple(sorted(s)) for s in fit}
    allu = [u for g in groups for u in g]
    tries = 0
    while len(fit) < n_fit and tries < 1000:
        tries += 1
        s = sorted(u for g in groups for u in rng.sample(g, rng.randint(0, len(g))))
        if tuple(s) not in seen:
            seen.add(tuple(s))
            fit.append(s)
    val: list[list[str]] = []
    while len(val) < n_val and tries < 2000:
        tries += 1
        s = sorted(rng.sample(allu, rng.randint(1, max(1, len(allu) - 1))))
        if tuple(s) not in seen:
            seen.add(tuple(s))
            val.append(s)
    return fit, val


def fit_additive(groups: list[list[str]], removed_sets: Sequence[Sequence[str]], p90s: Sequence[float]) -> tuple[float, dict[str, float]]:
    """Non-negative least squares of ``p90 = constant + sum_g cost_g * kept_in_g``."""
    from scipy.optimize import nnls  # heavy: scipy, only when a latency model is fitted

    a = np.array([[1.0] + [float(sum(u not in set(rem) for u in g)) for g in groups] for rem in removed_sets])
    coef, _ = nnls(a, np.asarray(p90s, dtype=float))
    costs = {u: float(coef[1 + gi]) for gi, g in enumerate(groups) for u in g}
    return float(coef[0]), costs


def measure_latency_model(model: torch.nn.Module, adapter: Any, example: torch.Tensor, profile: Any, target: Any,
                          work: Path, *, opset: Optional[int] = None, simplify: str = "onnxslim",
                          calib: Optional[Path] = None, rounds: int = 3, n_val: int = 4, seed: int = 0,
                          overrides: Optional[dict[str, Any]] = None, use_cache: bool = True,
                          log: Optional[Callable[[str], None]] = None) -> LatencyModel:
    """The cached latency model of ``model`` on ``target``, or a fresh measurement (then cached).
    Each timed pass uses :data:`FAST_BENCH`, shortened further where ``overrides`` (the run's own
    bench settings) ask for less."""
    ov = {k: min(v, (overrides or {}).get(k, v)) for k, v in FAST_BENCH.items()}
    key = cache_key(model, profile, target.where if hasattr(target, "where") else "local", ov)
    key["export"] = {"opset": opset, "simplify": simplify, "calib": bool(calib)}
    if use_cache:
        hit = load_cached(LatencyModel, key)
        if hit is not None:
            if log:
                log(f"latency model: from the cache ({cache_file(key)})")
            return hit
    t0 = time.perf_counter()
    units = adapter.units(model)
    groups = unit_groups(model, adapter, units, example)
    if not groups:
        raise UserError("this model has no removable units: nothing to budget")
    n_fit = min(max(8, 2 * (len(groups) + 1)), 40)
    fit_sets, val_sets = subset_design(groups, n_fit, n_val, seed)
    sets = {f"fit{i:02d}": s for i, s in enumerate(fit_sets)} | {f"val{i:02d}": s for i, s in enumerate(val_sets)}
    arts = {}
    for i, (n, rem) in enumerate(sets.items()):
        if log:
            log(f"latency model: building network {i + 1}/{len(sets)} ({len(rem)} units removed)")
        net = adapter.remove(model, rem) if rem else model
        arts[n] = build_artifact(net, example, profile, work / n, opset=opset, simplify=simplify, calib=calib)
    timed = time_artifacts(target, profile, arts, work / "bench", rounds=rounds, overrides=ov, seed=seed, log=log)
    fit_names = [n for n in sets if n.startswith("fit")]
    const, costs = fit_additive(groups, [sets[n] for n in fit_names], [timed[n]["p90_ms"] for n in fit_names])
    m = LatencyModel(constant_ms=const, unit_costs_ms=costs, groups=groups, key=key)
    points = []
    for n, rem in sets.items():
        pred, meas = m.predict(rem), timed[n]["p90_ms"]
        points.append({"name": n, "role": "fit" if n.startswith("fit") else "validation", "removed": rem,
                       "kept_removable": sum(len(g) for g in groups) - len(rem), "predicted_p90_ms": pred,
                       "measured_p90_ms": meas, "rel_error": abs(pred - meas) / meas, **timed[n]})
    val = [p for p in points if p["role"] == "validation"]
    m.points = points
    m.fit_residual_rel = float(np.mean([p["rel_error"] for p in points if p["role"] == "fit"]))
    m.validation = {"subsets": len(val), "mean_rel_error": float(np.mean([p["rel_error"] for p in val])) if val else None,
                    "max_rel_error": float(max(p["rel_error"] for p in val)) if val else None}
    m.measure_s = time.perf_counter() - t0
    if use_cache:
        save_cached(m)
    if log:
        log(f"latency model: constant {const:.3f} ms + {len(groups)} unit cost(s) "
            f"{', '.join(f'{costs[g[0]]:.3f}' for g in groups)} ms; validation error mean "
            f"{m.validation['mean_rel_error']:.3f}, max {m.validation['max_rel_error']:.3f} ({m.measure_s:.0f} s)")
    return m
