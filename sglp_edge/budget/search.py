"""``keep: auto``: the fewest removals whose network meets a device's p90 latency budget.

The SGLP analysis (CKA, segments, GradNorm) runs once; :func:`sglp_edge.sglp.prune.analyze`
steps through the number of removals, allocating them over the segments in proportion to the
measured latency of each segment's removable units, and asks :meth:`BudgetSearch.accept` about
each selection:

* predicted p90 (the target's :class:`~sglp_edge.budget.latency_model.LatencyModel`) above
  ``budget * (1 - margin)`` -> not measured, one more removal;
* otherwise the network is exported, compiled and benchmarked on the target with the profile's
  own bench settings (one *round*), in alternating passes with the unpruned network; a miss takes
  one more removal. A measured p90 within the
  budget ends the search, after a *step back*: earlier steps the margin passed over although their
  prediction is within the budget itself are measured too while rounds are left, so the margin
  never costs a unit the device could have kept;
* after ``max_rounds`` measured misses, or when no further removal can be placed, a one-line
  "cannot be met" :class:`UserError`. It is raised before the analysis when even the smallest
  network that could be built is predicted far above the budget.

*Anchored* p90: a candidate's figure is ``ratio x full``, where ``ratio`` is the median over
:data:`~sglp_edge.budget.latency_model.CANDIDATE_ROUNDS` alternating passes of its p90 over the
unpruned network's p90 in the same pass, and ``full`` is the unpruned p90 the latency model
measured (:meth:`LatencyModel.full_p90_ms`, the figure a budget set as a fraction of the unpruned
p90 rests on). On a stable board the unpruned network times now as it did then and the factor is
~1; on a shared machine whose speed drifts by 30-50 % over minutes the anchored figure expresses
every candidate at the speed the latency model was measured at, so the prediction, the budget and
the measurement compare like with like. Decisions (met, miss, step back) and the prediction error
use the anchored figure; each candidate record keeps the raw p90, the unpruned p90 measured
alongside, the ratio and the anchored figure.

Every candidate (predicted, measured, why taken or passed over) is recorded for plan.json and
report.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from benchmarks.board.calib import save_npz
from benchmarks.board.errors import UserError

from sglp_edge.budget.latency_model import (CANDIDATE_ROUNDS, LatencyModel, build_artifact, measure_latency_model,
                                            time_artifacts)
from sglp_edge.profiles.load import load_profile
from sglp_edge.targets.factory import make_target

#: raise before the analysis when the smallest buildable network is predicted this far above budget
FAR_ABOVE = 1.25
DEFAULT_MARGIN = 0.05
DEFAULT_ROUNDS = 3


def budget_from_profile(profile: Any, budget_ms: Optional[float]) -> tuple[float, str]:
    """The p90 budget (ms) and where it came from: the given value, else the profile's
    ``latency_p90_ms <=`` constraint."""
    if budget_ms is not None:
        if budget_ms <= 0:
            raise UserError(f"--latency-budget must be a positive number of milliseconds (got {budget_ms})")
        return float(budget_ms), "given"
    for c in profile.constraints:
        if c.metric == "latency_p90_ms" and c.op == "<=":
            return float(c.limit), f"profile {profile.name}: latency_p90_ms <= {c.limit:g}"
    raise UserError(f"keep: auto needs a latency budget: profile {profile.name} has no latency_p90_ms constraint; "
                    "give --latency-budget MS (or prune.latency_budget_ms)")


def check_budget_settings(margin: float, rounds: int) -> None:
    if not 0.0 <= margin < 0.9:
        raise UserError(f"--latency-margin is a fraction of the budget kept in reserve, 0 <= m < 0.9 (got {margin})")
    if rounds < 1:
        raise UserError(f"--latency-rounds must be >= 1 (got {rounds})")


def fewest_removals(lm: LatencyModel, target_ms: float) -> int:
    """A lower bound on the removals any selection needs: the most expensive units first."""
    pred, n = lm.predict([]), 0
    for c in sorted(lm.unit_costs_ms.values(), reverse=True):
        if pred <= target_ms:
            break
        pred -= c
        n += 1
    return n


class BudgetSearch:
    def __init__(self, model: torch.nn.Module, adapter: Any, example: torch.Tensor, profile: Any, target: Any,
                 lm: LatencyModel, budget_ms: float, *, margin: float = DEFAULT_MARGIN, max_rounds: int = DEFAULT_ROUNDS,
                 work: Path, opset: Optional[int] = None, simplify: str = "onnxslim", calib: Optional[Path] = None,
                 overrides: Optional[dict[str, Any]] = None, budget_source: str = "given",
                 log: Optional[Callable[[str], None]] = None) -> None:
        check_budget_settings(margin, max_rounds)
        self.model, self.adapter, self.example, self.profile, self.target = model, adapter, example, profile, target
        self.lm, self.budget_ms, self.margin, self.max_rounds = lm, float(budget_ms), float(margin), int(max_rounds)
        self.work, self.opset, self.simplify, self.calib = Path(work), opset, simplify, calib
        self.overrides, self.budget_source, self.log = dict(overrides or {}), budget_source, log or (lambda m: None)
        self.units = adapter.units(model)
        self.n_units = len(self.units)
        self.target_ms = self.budget_ms * (1.0 - self.margin)
        self.candidates: list[dict[str, Any]] = []
        self.rounds = 0
        self.chosen: Optional[dict[str, Any]] = None
        self.chosen_n: Optional[int] = None
        self.start = max(1, fewest_removals(lm, self.target_ms))
        self.full_ms = lm.full_p90_ms()  # the anchor (see the module docstring)
        self._reference: Optional[Path] = None

    # ---- checks before the analysis ------------------------------------------------------------
    def check_feasible(self) -> None:
        floor = self.lm.smallest_ms()
        if floor > self.target_ms * FAR_ABOVE:
            fixed = sum(not u.removable for u in self.units)
            raise UserError(f"latency budget {self.budget_ms:.4g} ms on {self.profile.name} cannot be met: the smallest "
                            f"network reaches {floor:.4g} ms p90 (predicted, keeping only the {fixed} units that cannot "
                            f"be removed); raise the budget (--latency-budget) or pick a faster device")

    # ---- the analysis' callbacks -----------------------------------------------------------------
    def accept(self, removed: Sequence[str]) -> bool:
        pred = self.lm.predict(removed)
        cand: dict[str, Any] = {"removed": list(removed), "n_removed": len(removed),
                                "kept": self.n_units - len(removed), "predicted_p90_ms": pred, "measured_p90_ms": None}
        self.candidates.append(cand)
        if pred > self.target_ms:
            cand["verdict"] = (f"predicted {pred:.3f} ms > {self.target_ms:.3f} ms (budget x (1 - margin)): "
                               "not measured, one more removal")
            self.log(f"budget: keep {cand['kept']}: predicted {pred:.3f} ms, above {self.target_ms:.3f} ms")
            return False
        self.rounds += 1
        cand["round"] = self.rounds
        meas = self._measured(cand, self.measure(removed, f"round{self.rounds}"))
        self.log(f"budget: round {self.rounds}: keep {cand['kept']}: predicted {pred:.3f} ms, measured p90 "
                 f"{meas['p90_ms']:.3f} ms anchored (raw {meas['raw_p90_ms']:.3f} ms, x {meas['ratio']:.3f} of the "
                 f"unpruned {meas['reference_p90_ms']:.3f} ms now; budget {self.budget_ms:.3f} ms)")
        if meas["p90_ms"] <= self.budget_ms:
            cand["verdict"] = (f"met: predicted p90 within {self.target_ms:.3f} ms, measured p90 {meas['p90_ms']:.3f} ms "
                               f"within the budget {self.budget_ms:.3f} ms")
            best = self._step_back(cand)
            if best is not cand:
                cand["verdict"] += "; not chosen: fewer removals also measured within the budget"
            self._choose(best)
            return True
        if self.rounds >= self.max_rounds:
            cand["verdict"] = "measured above the budget; no rounds left"
            raise UserError(f"latency budget {self.budget_ms:.4g} ms on {self.profile.name} cannot be met in "
                            f"{self.max_rounds} rounds: the smallest network tried (keep {cand['kept']}) reaches "
                            f"{meas['p90_ms']:.4g} ms p90 (measured, anchored; the smallest buildable one is predicted at "
                            f"{self.lm.smallest_ms():.4g} ms); raise the budget or --latency-rounds")
        cand["verdict"] = f"measured {meas['p90_ms']:.3f} ms > budget {self.budget_ms:.3f} ms: one more removal"
        return False

    def _step_back(self, met: dict[str, Any]) -> dict[str, Any]:
        """With rounds left, measure the earlier steps (fewer removals) that the margin passed over
        although their prediction is within the budget itself; the fewest removals measured within
        the budget wins."""
        best = met
        for c in reversed(self.candidates[:-1]):
            if self.rounds >= self.max_rounds or c["predicted_p90_ms"] > self.budget_ms or c.get("measured_p90_ms"):
                break
            self.rounds += 1
            c["round"] = self.rounds
            meas = self._measured(c, self.measure(c["removed"], f"round{self.rounds}"))
            self.log(f"budget: round {self.rounds} (a step back inside the margin): keep {c['kept']}: predicted "
                     f"{c['predicted_p90_ms']:.3f} ms, measured p90 {meas['p90_ms']:.3f} ms anchored (raw "
                     f"{meas['raw_p90_ms']:.3f} ms, x {meas['ratio']:.3f})")
            if meas["p90_ms"] > self.budget_ms:
                c["verdict"] += f"; measured {meas['p90_ms']:.3f} ms > budget on a step back"
                break
            c["verdict"] += f"; measured {meas['p90_ms']:.3f} ms within the budget on a step back"
            best = c
        return best

    def _choose(self, c: dict[str, Any]) -> None:
        c["verdict"] = (f"chosen: the fewest removals measured within the budget {self.budget_ms:.3f} ms "
                        f"(p90 {c['measured_p90_ms']:.3f} ms, predicted {c['predicted_p90_ms']:.3f} ms)")
        self.chosen, self.chosen_n = c, c["n_removed"]

    def exhausted(self, n_remove: int) -> None:
        measured = [c for c in self.candidates if c.get("measured_p90_ms") is not None]
        if measured:
            last = measured[-1]
            how = f"{last['measured_p90_ms']:.4g} ms p90 (measured, keep {last['kept']})"
        elif self.candidates:
            last = self.candidates[-1]
            how = f"{last['predicted_p90_ms']:.4g} ms p90 (predicted, keep {last['kept']})"
        else:
            how = f"{self.lm.smallest_ms():.4g} ms p90 (predicted floor)"
        raise UserError(f"latency budget {self.budget_ms:.4g} ms on {self.profile.name} cannot be met: the smallest "
                        f"network reaches {how}; {n_remove} removals cannot be placed while every SGLP segment keeps "
                        "a unit; raise the budget (--latency-budget) or pick a faster device")

    def _measured(self, cand: dict[str, Any], meas: dict[str, Any]) -> dict[str, Any]:
        """Record a measurement on its candidate: the anchored p90 as ``measured_p90_ms`` (what
        the decisions and the prediction error use) with the raw figures beside it."""
        cand.update(measured_p90_ms=meas["p90_ms"], anchored_p90_ms=meas["p90_ms"], raw_p90_ms=meas["raw_p90_ms"],
                    reference_p90_ms=meas["reference_p90_ms"], ratio=meas["ratio"], measured=meas,
                    prediction_error=abs(cand["predicted_p90_ms"] - meas["p90_ms"]) / meas["p90_ms"])
        return meas

    def reference(self) -> Path:
        """The unpruned network's artifact, built once (on the first measured round)."""
        if self._reference is None:
            self._reference = build_artifact(self.model, self.example, self.profile, self.work / "reference",
                                             opset=self.opset, simplify=self.simplify, calib=self.calib)
        return self._reference

    def measure(self, removed: Sequence[str], name: str) -> dict[str, Any]:
        """Export, compile and benchmark one candidate on the target in :data:`CANDIDATE_ROUNDS`
        alternating passes with the unpruned network: ``p90_ms`` is the anchored figure (median
        ratio x the latency model's unpruned p90), ``raw_p90_ms`` the median of its own p90s."""
        net = self.adapter.remove(self.model, list(removed)) if removed else self.model
        art = build_artifact(net, self.example, self.profile, self.work / name, opset=self.opset,
                             simplify=self.simplify, calib=self.calib)
        t = time_artifacts(self.target, self.profile, {name: art}, self.work / name / "bench", rounds=CANDIDATE_ROUNDS,
                           overrides=self.overrides, reference=self.reference())[name]
        return {**t, "raw_p90_ms": t["p90_ms"], "p90_ms": t["ratio"] * self.full_ms, "anchor_full_p90_ms": self.full_ms}

    def record(self) -> dict[str, Any]:
        lm = self.lm
        return {
            "device": self.profile.name, "backend": self.profile.backend, "precision": self.profile.precision,
            "threads": self.profile.threads, "batch": self.profile.bench.batch_sizes[0],
            "budget_ms": self.budget_ms, "budget_source": self.budget_source, "margin": self.margin,
            "predicted_target_ms": self.target_ms, "max_rounds": self.max_rounds, "rounds": self.rounds,
            "anchor_full_p90_ms": self.full_ms,
            "anchoring": "measured_p90_ms = median over alternating passes of (candidate p90 / unpruned p90 in the "
                         "same pass) x anchor_full_p90_ms (the unpruned p90 the latency model measured); raw_p90_ms "
                         "is the candidate's own median p90",
            "start_removals": self.start, "candidates": self.candidates, "chosen": self.chosen,
            "why": (self.chosen or {}).get("verdict"),
            "latency_model": {"constant_ms": lm.constant_ms, "unit_costs_ms": lm.unit_costs_ms, "groups": lm.groups,
                              "validation": lm.validation, "fit_residual_rel": lm.fit_residual_rel,
                              "measure_s": lm.measure_s, "cached": lm.cached, "key": lm.key},
        }


def make_search(loaded: Any, batches: Sequence[Any], *, device: Optional[str], budget_ms: Optional[float], margin: float,
                rounds: int, work: Path, opset: Optional[int] = None, simplify: str = "onnxslim",
                bench: Optional[dict[str, Any]] = None, seed: int = 0, log: Optional[Callable[[str], None]] = None,
                use_cache: bool = True) -> BudgetSearch:
    """The latency model of ``loaded`` on ``device`` (cached, else measured) and the search over
    it; raises the "cannot be met" error here, before the analysis, when the budget is far out of reach."""
    prof = load_profile(device or "local-cpu-ort")
    budget, source = budget_from_profile(prof, budget_ms)
    check_budget_settings(margin, rounds)
    target = make_target(prof)
    if target.emulated:
        raise UserError(f"{prof.name} runs on the emulated ARM board, whose timings are not a board's: a latency "
                        "budget needs real timing (give a board with --host, or a local profile)")
    example = batches[0][0][:1] if isinstance(batches[0], (tuple, list)) else batches[0][:1]
    calib = None
    if prof.precision == "int8":
        x = torch.cat([b[0] for b in batches]).numpy().astype(np.float32)
        calib = save_npz(Path(work) / "calib.npz", x)
    log = log or (lambda m: None)
    lm = measure_latency_model(loaded.model, loaded.adapter, example, prof, target, Path(work) / "model", opset=opset,
                               simplify=simplify, calib=calib, seed=seed, use_cache=use_cache, log=log, overrides=bench)
    s = BudgetSearch(loaded.model, loaded.adapter, example, prof, target, lm, budget, margin=margin, max_rounds=rounds,
                     work=Path(work) / "search", opset=opset, simplify=simplify, calib=calib,
                     overrides={k: v for k, v in (bench or {}).items() if k not in ("max_eval", "eval_batch")},
                     budget_source=source, log=log)
    s.check_feasible()
    return s
