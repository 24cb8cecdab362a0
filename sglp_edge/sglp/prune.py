"""The SGLP analysis end to end: unit outputs -> CKA -> Fisher segments -> GradNorm selection ->
a plan (which units go) -> a genuinely smaller network. Baselines run through the same entry
point (``method=``) so that methods are compared at equal layer budget.

How SGLP chooses k and places the removals in its segments is in :mod:`sglp_edge.sglp.selection`;
the config and the plan are in :mod:`sglp_edge.sglp.plan`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, Unit, capture_unit_outputs, get_module
from sglp_edge.sglp.baselines import select_baseline
from sglp_edge.sglp.cka import MinibatchCKA
from sglp_edge.sglp.heal import HEALS, heal_linear
from sglp_edge.sglp.allocation import adjacent_redundancy
from sglp_edge.sglp.importance import PROTOCOLS, CandidateScorer, SegmentSelection, resolve_protocol
from sglp_edge.sglp.prefix_cache import PrefixReplay
from sglp_edge.sglp.plan import ALLOCATIONS, K_BUDGETS, METHODS, PruneConfig, PrunePlan
from sglp_edge.sglp.segmentation import fisher_loss_table, fisher_segments, sequence_from_cka
from sglp_edge.sglp.selection import allocation_mode, choose_k_auto, select_all
from sglp_edge.train.teacher_targets import DEGENERATE, scores_all_equal


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, adapter: ModelAdapter, example: Any, units: Sequence[Unit] = ()) -> tuple[int, dict[str, int]]:
    """MACs of one forward pass on ``example`` (conv/linear/matmul and attention, via torch's
    FlopCounterMode), and the MACs inside each named unit. Attention is counted in the path the
    model takes: ``nn.MultiheadAttention``'s fused eval-mode kernel (which the counter does not see)
    is switched off while counting, and the CPU kernel of ``scaled_dot_product_attention`` is
    counted like the GPU ones (2 x batch x heads x queries x keys x head dim)."""
    from torch.utils.flop_counter import FlopCounterMode

    with _mha_fastpath_off(), FlopCounterMode(display=False, custom_mapping=_attention_flops()) as fc, \
            torch.no_grad():
        adapter.forward(model, example)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = type(model).__name__
    per_unit = {u.name: int(counts.get(f"{root}.{u.name}", 0) // 2) for u in units}
    return int(counts.get("Global", 0) // 2), per_unit


class _mha_fastpath_off:
    """Within: ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` take their unfused path."""

    def __enter__(self) -> None:
        mha = getattr(torch.backends, "mha", None)
        self._was = mha.get_fastpath_enabled() if mha is not None else None
        if mha is not None:
            mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        if self._was is not None:
            torch.backends.mha.set_fastpath_enabled(self._was)


def _attention_flops() -> dict[Any, Any]:
    """FLOP formulas for attention kernels torch's counter leaves out (the CPU SDPA kernels)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    ops = (getattr(torch.ops.aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                                       "_scaled_dot_product_fused_attention_overrideable"))
    return {op: sdpa for op in ops if op is not None}


def _first_example(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return (batch[0][:1],) + tuple(batch[1:])  # keep structure, batch of one
    if isinstance(batch, dict):
        return {k: v[:1] for k, v in batch.items()}
    return batch[:1]


def n_remove_for_keep(units: Sequence[Unit], keep: int) -> int:
    n = len(units)
    fixed = sum(not u.removable for u in units)
    if keep > n:
        raise UserError(f"--keep {keep} is larger than the model's {n} prunable units")
    if keep < fixed:
        raise UserError(f"--keep {keep} is below the {fixed} units that cannot be removed (stem, stride/channel "
                        f"changes); use --keep between {fixed} and {n}")
    return n - keep


def compute_cka(model: nn.Module, adapter: ModelAdapter, units: Sequence[Unit], batches: Sequence[Any],
                mode: str = "tokens", progress: Any = None) -> np.ndarray:
    acc = MinibatchCKA(len(units), mode=mode)
    task = progress.add_task("CKA over calibration batches", total=len(batches)) if progress else None
    model.eval()
    for b in batches:
        mask = b.get("attention_mask") if isinstance(b, dict) else None  # padding is not an example
        acc.update(capture_unit_outputs(adapter, model, units, b), mask=mask)
        if progress:
            progress.advance(task)
    return acc.compute()


@dataclass
class _Analysis:
    """What the steps of :func:`analyze` share: the measured model and the plan's fields as they fill in."""
    model: nn.Module
    adapter: ModelAdapter
    cfg: PruneConfig
    units: list[Unit]
    unit_macs: dict[str, int]
    macs_before: int
    params_before: int
    removable: list[Unit]
    progress: Any = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    plan_kw: dict[str, Any] = field(default_factory=dict)

    def target_reached(self, removed: Sequence[str], n_remove: int) -> bool:
        """Whether ``removed`` is enough: keep N was given, the MACs target is met, or nothing is left to remove."""
        got = sum(self.unit_macs[u] for u in removed) / self.macs_before if self.macs_before else 0.0
        return self.cfg.target_macs is None or got >= self.cfg.target_macs or n_remove >= len(self.removable)


def analyze(model: nn.Module, adapter: ModelAdapter, cka_batches: Sequence[Any], grad_batches: Sequence[Any],
            cfg: PruneConfig, progress: Any = None, removal_search: Any = None) -> PrunePlan:
    """Run the chosen method and return the plan (nothing is modified). ``removal_search`` (SGLP
    only; see :class:`sglp_edge.budget.search.BudgetSearch`) replaces keep/target_macs: starting at
    its ``start`` removals, one more each step until its ``accept(removed)`` says yes; its
    ``exhausted(n)`` is called (and raises) when ``n`` removals can no longer be placed."""
    protocol_by = _check_config(model, adapter, cka_batches, grad_batches, cfg, removal_search)
    t0 = time.perf_counter()
    run = _measure(model, adapter, cka_batches[0], cfg, progress)
    if protocol_by and cfg.method == "sglp":
        run.notes.append(protocol_by + ("the calibration-loss score (loss): it measured best after KD on decoder LMs "
                                        "and CNNs (benchmarks/results/sglp-vs-baselines-*.md)"
                                        if cfg.protocol == "loss" else "natural GradNorm (the paper's criterion)"))
    n_remove = _initial_removals(run)
    if cfg.method == "sglp":
        segments, redundancy = _sglp_segments(run, cka_batches, n_remove)
        removed, evaluations = _sglp_select(run, grad_batches, segments, redundancy, n_remove, removal_search)
    else:
        removed, evaluations = _baseline_select(run, grad_batches, n_remove)
    return _make_plan(run, removed, evaluations, t0)


def _check_config(model: nn.Module, adapter: ModelAdapter, cka_batches: Sequence[Any], grad_batches: Sequence[Any],
                  cfg: PruneConfig, removal_search: Any) -> str:
    """Refuse a bad config in one line; set ``cfg.keep`` for a removal search and resolve
    ``cfg.protocol``. Returns the note prefix when the protocol was chosen automatically."""
    if removal_search is not None:
        if cfg.method != "sglp":
            raise UserError(f"a latency budget (keep: auto) searches with SGLP; --method {cfg.method} takes --keep N")
        cfg.keep = len(adapter.units(model)) - removal_search.start  # the first step; the search goes on from it
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.heal not in HEALS:
        raise UserError(f"unknown --heal {cfg.heal!r}; choose one of {', '.join(HEALS)}")
    if cfg.protocol not in ("auto", *PROTOCOLS):
        raise UserError(f"unknown protocol {cfg.protocol!r}; choose one of auto, {', '.join(PROTOCOLS)}")
    protocol_by = "--protocol auto: " if cfg.protocol == "auto" else ""
    cfg.protocol = resolve_protocol(cfg.protocol, getattr(adapter, "modality", "image"))
    if cfg.allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {cfg.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if cfg.k_budget not in K_BUDGETS:
        raise UserError(f"unknown --k-budget {cfg.k_budget!r}; choose one of {', '.join(K_BUDGETS)}")
    if (cfg.keep is None) == (cfg.target_macs is None):
        raise UserError("give exactly one of --keep N or --target-macs R")
    if cfg.target_macs is not None and not 0.0 < cfg.target_macs < 1.0:
        raise UserError(f"--target-macs is the fraction of MACs to remove, between 0 and 1; got {cfg.target_macs}")
    if not cka_batches or not grad_batches:
        raise UserError("no calibration batches: check --data and --calib-batches")
    return protocol_by


def _measure(model: nn.Module, adapter: ModelAdapter, batch: Any, cfg: PruneConfig, progress: Any) -> _Analysis:
    """The model's units, MACs (in all and per unit) and parameters, on one example of ``batch``."""
    model.eval()
    if hasattr(adapter, "check_shapes"):
        adapter.check_shapes(model, batch)
    units = adapter.units(model)
    macs_before, unit_macs = count_macs(model, adapter, _first_example(batch), units)
    params_before = count_params(model)
    removable = [u for u in units if u.removable]
    if not removable:
        raise UserError("this model has no removable units")
    return _Analysis(model, adapter, cfg, units, unit_macs, macs_before, params_before, removable, progress)


def _initial_removals(run: _Analysis) -> int:
    """How many units to remove: from ``keep``, or the estimate that reaches ``target_macs`` on average units."""
    if run.cfg.keep is not None:
        return n_remove_for_keep(run.units, run.cfg.keep)
    mean_macs = sum(run.unit_macs[u.name] for u in run.removable) / len(run.removable)
    return min(len(run.removable), max(1, math.ceil(run.cfg.target_macs * run.macs_before / max(mean_macs, 1))))


def _sglp_segments(run: _Analysis, cka_batches: Sequence[Any], n_remove: int) -> tuple[list, Sequence[float] | None]:
    """CKA over the calibration batches -> the sequence -> k -> Fisher segments (recorded in the plan);
    returns the segments and the CKA redundancy when removals are allocated by it."""
    cfg, units = run.cfg, run.units
    t = time.perf_counter()
    cka = compute_cka(run.model, run.adapter, units, cka_batches, cfg.cka_mode, run.progress)
    run.timings["cka_s"] = time.perf_counter() - t
    x = sequence_from_cka(cka, mode=cfg.sequence)
    alloc_mode = allocation_mode(cfg, run.adapter)
    redundancy = adjacent_redundancy(cka) if alloc_mode == "redundancy" else None
    run.plan_kw["allocation"] = alloc_mode
    n = len(units)
    k_max = cfg.k_max or max(1, min(10, n // 2))
    if cfg.k is not None:
        if not 1 <= cfg.k <= n:
            raise UserError(f"--k {cfg.k} must be between 1 and the number of units ({n})")
        k, k_by = cfg.k, "user"
        k_choice: dict[str, Any] = {"k": k, "chosen_by": "user", "why": f"--k {k} given"}
    else:
        k, k_by, k_choice = choose_k_auto(x, units, k_max, n_remove, cfg, redundancy)
        if k_choice.get("note"):
            run.notes.append(k_choice["note"])
    run.plan_kw["k_choice"] = k_choice
    segments = fisher_segments(x, k)
    loss_table = fisher_loss_table(x, max(k, k_max))
    run.plan_kw.update(cka=cka.tolist(), sequence=[float(v) for v in x], segments=[list(s) for s in segments],
                       k=k, k_chosen_by=k_by, loss_table=[float(v) for v in loss_table])
    return segments, redundancy


def _sglp_select(run: _Analysis, grad_batches: Sequence[Any], segments: list, redundancy: Sequence[float] | None,
                 n_remove: int, removal_search: Any) -> tuple[list[str], int]:
    """The candidate search in every segment, repeated with one more removal until the MACs target
    is met or the removal search accepts; returns (removed unit names, evaluations)."""
    cfg, units = run.cfg, run.units
    scored = run.adapter.with_targets(run.model, grad_batches)
    replay = PrefixReplay(run.model, run.adapter, units, scored) if cfg.prefix_cache and cfg.protocol == "loss" else None
    scorer = CandidateScorer(run.model, run.adapter, scored, protocol=cfg.protocol, seed=cfg.seed, replay=replay)
    t = time.perf_counter()
    tried: dict[int, tuple[list[SegmentSelection], dict[str, Any]]] = {}
    while True:
        try:
            selections, budget = tried[n_remove] = select_all(scorer, units, segments, n_remove, cfg, run.progress,
                                                              redundancy)
        except UserError:
            if removal_search is None:
                raise
            removal_search.exhausted(n_remove)  # raises: no network with n_remove removals can be built
        removed = [u for s in selections for u in s.remove]
        if removal_search is not None:
            if removal_search.accept([u.name for u in units if u.name in set(removed)]):
                # the search may settle on an earlier step (fewer removals, measured within budget)
                selections, budget = tried.get(getattr(removal_search, "chosen_n", n_remove), (selections, budget))
                removed = [u for s in selections for u in s.remove]
                break
            n_remove += 1
            continue
        if run.target_reached(removed, n_remove):
            break
        n_remove += 1  # re-select with one more removal; cached candidates cost nothing
    run.timings["gradnorm_s"] = time.perf_counter() - t
    run.plan_kw["prefix_cache"] = ({"used": replay.usable, **({"why_not": replay.why_not} if replay.why_not else {})}
                                   if replay is not None else {"used": False})
    _check_scores_differ(selections, cfg, run.notes)
    evaluations = scorer.evaluations
    run.plan_kw["selections"] = [asdict(s) for s in selections]
    if removal_search is not None:
        run.plan_kw["search"] = removal_search.record()
    run.plan_kw["budget"] = {**budget, "spent": [s.evaluations for s in selections],
                             "search": [s.method for s in selections], "total_spent": evaluations}
    return removed, evaluations


def _baseline_select(run: _Analysis, grad_batches: Sequence[Any], n_remove: int) -> tuple[list[str], int]:
    """A baseline's choice, with one more removal until the MACs target is met; (removed, 0 evaluations)."""
    t = time.perf_counter()
    while True:
        res = select_baseline(run.cfg.method, run.adapter, run.model, run.units, list(grad_batches), n_remove,
                              seed=run.cfg.seed)
        removed = list(res.removed)
        if run.target_reached(removed, n_remove):
            break
        n_remove += 1
    run.timings["select_s"] = time.perf_counter() - t
    if res.notes:
        run.notes.append(res.notes)
    run.plan_kw["selections"] = [{"method": run.cfg.method, "scores": res.scores}]
    return removed, 0


def _make_plan(run: _Analysis, removed: Sequence[str], evaluations: int, t0: float) -> PrunePlan:
    model, units = run.model, run.units
    removed_set = set(removed)
    kept = [u.name for u in units if u.name not in removed_set]
    macs_after = run.macs_before - sum(run.unit_macs[u] for u in removed)
    params_after = run.params_before - sum(sum(p.numel() for p in get_module(model, u).parameters()) for u in removed)
    unit_rows = [dict(u.to_dict(), kept=u.name not in removed_set, macs=run.unit_macs[u.name],
                      params=sum(p.numel() for p in get_module(model, u.name).parameters())) for u in units]
    return PrunePlan(
        method=run.cfg.method, family=run.adapter.family, units=unit_rows,
        removed=[u.name for u in units if u.name in removed_set], kept=kept, n_units_before=len(units),
        n_units_after=len(kept), params_before=run.params_before, params_after=params_after,
        macs_before=run.macs_before, macs_after=macs_after, evaluations=evaluations,
        wall_s=time.perf_counter() - t0, config=asdict(run.cfg), notes=run.notes, timings=run.timings, **run.plan_kw,
    )


def _check_scores_differ(selections: Sequence[SegmentSelection], cfg: PruneConfig, notes: list[str]) -> None:
    """Every candidate scoring the same means the choice is a silent tie-break: stop (one line)
    unless ``allow_degenerate``."""
    scores = [v for s in selections for v in s.scores.values()]
    if not scores_all_equal(scores):
        return
    line = f"all {len(scores)} candidate scores are equal ({scores[0]:.6g}): " + DEGENERATE
    if not cfg.allow_degenerate:
        raise UserError(line)
    notes.append("warning: " + line.split(" (--allow")[0] + "; the removals are a tie-break")


def apply_plan(model: nn.Module, adapter: ModelAdapter, plan: PrunePlan, batches: Sequence[Any] = ()) -> nn.Module:
    """The pruned network: a deep copy with the plan's units removed; with ``heal: linear`` in the
    plan's config, each removed run is first replaced by a fitted linear map folded into the kept
    weights (on ``batches``, calibration batches from the training split) and ``plan.heal`` records
    what was fitted and where it helped."""
    heal = (plan.config or {}).get("heal", "none")
    if heal == "none" or not plan.removed:
        return adapter.remove(model, plan.removed)
    t = time.perf_counter()
    healed, report = heal_linear(model, adapter, plan.removed, batches, ridge=float(plan.config.get("heal_ridge", 1e-2)))
    plan.heal = {**report.to_dict(), "wall_s": time.perf_counter() - t}
    return adapter.remove(healed, plan.removed, inplace=True)
