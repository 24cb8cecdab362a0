"""How SGLP places its removals (used by :func:`sglp_edge.sglp.prune.analyze`): the number of
segments k (the k rule on the Fisher loss curve, raised to fit the GradNorm evaluation budget under
``k_budget="raise"``), how many removals each segment takes (proportional, by CKA redundancy or by
measured latency) and the per-segment search that picks them, with the budget shared out."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, Unit
from sglp_edge.sglp.allocation import allocate_removals, allocate_removals_by_redundancy, split_budget
from sglp_edge.sglp.importance import (CandidateScorer, SegmentSelection, min_search_cost, resolve_allocation, search_cost,
                                       select_in_segment)
from sglp_edge.sglp.plan import PruneConfig
from sglp_edge.sglp.segmentation import choose_k, elbow_curve, fisher_segments


def search_direction(cfg: PruneConfig) -> str:
    if cfg.direction == "auto":  # under the natural protocol a built-up partial net is far from trained: tear down
        return "down" if cfg.protocol in ("natural", "loss", "healed") else "auto"
    return cfg.direction


def allocation_mode(cfg: PruneConfig, adapter: ModelAdapter) -> str:
    return resolve_allocation(cfg.allocation, getattr(adapter, "modality", "image"))


def allocate(units: Sequence[Unit], segments: Sequence[tuple[int, int]], n_remove: int,
              redundancy: Sequence[float] | None, costs: dict[str, float] | None = None) -> list[int]:
    """Removals per segment: by redundancy when given, else in proportion to removable units (or
    to their measured latency, with ``costs``)."""
    if costs is not None:
        return allocate_removals([sum(u.removable for u in units[a:b]) for a, b in segments],
                                 [b - a for a, b in segments], n_remove,
                                 weights=[sum(costs.get(u.name, 0.0) for u in units[a:b] if u.removable)
                                          for a, b in segments])
    if redundancy is not None:
        return allocate_removals_by_redundancy([range(a, b) for a, b in segments], [u.removable for u in units],
                                               redundancy, n_remove)
    return allocate_removals([sum(u.removable for u in units[a:b]) for a, b in segments],
                             [b - a for a, b in segments], n_remove)


def search_need(units: Sequence[Unit], segments: Sequence[tuple[int, int]], n_remove: int, cfg: PruneConfig,
                 redundancy: Sequence[float] | None = None) -> int | None:
    """Evaluations the preferred search (exhaustive or beam) needs over these segments; None when
    the removals cannot be placed (a segment would be emptied)."""
    seg_removable = [[u for u in units[a:b] if u.removable] for a, b in segments]
    try:
        alloc = allocate(units, segments, n_remove, redundancy, cfg.unit_costs)
    except UserError:
        return None
    return sum(search_cost(len(r), len(r) - a, cfg.exhaustive_budget, cfg.beam_width, search_direction(cfg))
               for r, a in zip(seg_removable, alloc))


def fit_k_to_budget(x: np.ndarray, units: Sequence[Unit], k: int, k_max: int, n_remove: int,
                     cfg: PruneConfig, redundancy: Sequence[float] | None = None) -> tuple[int, int | None]:
    """The k rule's choice, raised (up to k_max) to the smallest k whose search fits the evaluation
    budget without falling back to the shortlist greedy. Returns (k, the rule's k if raised else None).
    When no k up to k_max fits, the rule's k stays and the budgeted greedy search is used."""
    if cfg.eval_budget is None:
        return k, None
    for kk in range(k, max(k, k_max) + 1):
        need = search_need(units, fisher_segments(x, kk), n_remove, cfg, redundancy)
        if need is not None and need <= cfg.eval_budget:
            return kk, (k if kk != k else None)
    return k, None


def choose_k_auto(x: np.ndarray, units: Sequence[Unit], k_max: int, n_remove: int, cfg: PruneConfig,
              redundancy: Sequence[float] | None) -> tuple[int, str, dict[str, Any]]:
    """(k, how it was chosen, the record of why) for an automatic k. The k rule reads the CKA
    structure; under ``k_budget="search"`` that k stays and the evaluation budget goes to the
    search inside its segments; under ``"raise"`` k is raised to the smallest whose
    exhaustive/beam searches fit the budget. The record holds the loss and elbow distance per k
    and the evaluations each k's exhaustive/beam search would need."""
    rule_k = choose_k(x, k_max=k_max, rule=cfg.k_rule)
    needs = {kk: search_need(units, fisher_segments(x, kk), n_remove, cfg, redundancy)
             for kk in range(1, k_max + 1)}
    placeable = [kk for kk in range(min(rule_k, k_max), 0, -1) if needs[kk] is not None]
    lowered = rule_k if placeable and placeable[0] != rule_k else None
    if lowered:  # each segment keeps a unit: fewer segments so that every --keep from the fixed units up works
        rule_k = placeable[0]
    rec: dict[str, Any] = {"rule": cfg.k_rule, "k_max": k_max, "rule_k": rule_k, **elbow_curve(x, k_max),
                           "k_budget": cfg.k_budget, "eval_budget": cfg.eval_budget,
                           "search_need_by_k": {str(kk): v for kk, v in needs.items()}}
    k, k_by = rule_k, cfg.k_rule
    why = f"the {cfg.k_rule} rule on the Fisher loss curve gives k={lowered or rule_k}"
    if lowered:
        why += f"; lowered to {rule_k}, the most segments that can each keep a unit after {n_remove} removals"
    if cfg.k_budget == "raise":
        k, raised = fit_k_to_budget(x, units, rule_k, k_max, n_remove, cfg, redundancy)
        if raised:
            k_by = f"{cfg.k_rule}+budget"
            rec["note"] = (f"k raised from {raised} ({cfg.k_rule}) to {k}: the smallest number of segments whose "
                           f"GradNorm search (exhaustive or beam) fits --eval-budget {cfg.eval_budget} (--k-budget raise)")
            why += f"; raised to {k} so that exhaustive/beam search fits the budget of {cfg.eval_budget} (--k-budget raise)"
        else:
            why += "; kept: its searches fit the evaluation budget"
    else:  # (more segments never help placing the removals: each segment keeps a unit)
        need = needs[k]
        if need is not None and cfg.eval_budget is not None and need > cfg.eval_budget:
            why += (f"; kept (--k-budget search): its exhaustive/beam searches would need {need} evaluations, so the "
                    f"budget of {cfg.eval_budget} is shared over its segments for a budgeted search inside each")
        else:
            why += "; kept: its searches fit the evaluation budget"
    rec.update(k=k, chosen_by=k_by, why=why)
    return k, k_by, rec


def select_all(scorer: CandidateScorer, units: Sequence[Unit], segments: Sequence[tuple[int, int]], n_remove: int,
                 cfg: PruneConfig, progress: Any,
                 redundancy: Sequence[float] | None = None) -> tuple[list[SegmentSelection], dict[str, Any]]:
    seg_removable = [[u.name for u in units[a:b] if u.removable] for a, b in segments]
    alloc = allocate(units, segments, n_remove, redundancy, cfg.unit_costs)
    direction = search_direction(cfg)
    shape = [(len(r), len(r) - a) for r, a in zip(seg_removable, alloc)]
    needs = [search_cost(n, r, cfg.exhaustive_budget, cfg.beam_width, direction) for n, r in shape]
    shares = split_budget(needs, [min_search_cost(n, r) for n, r in shape], cfg.eval_budget)
    total = sum(search_cost(n, r, cfg.exhaustive_budget, cfg.beam_width, direction, sh)
                for (n, r), sh in zip(shape, shares))
    task = progress.add_task(f"{'GradNorm' if cfg.protocol in ('natural', 'reference') else 'candidate loss'} ({cfg.protocol}) over {len(segments)} segments", total=total) if progress else None
    if progress:
        scorer.on_evaluation = lambda: progress.advance(task)
    out = []
    for i, (names, a, sh) in enumerate(zip(seg_removable, alloc, shares)):
        out.append(select_in_segment(scorer, i, names, len(names) - a, exhaustive_budget=cfg.exhaustive_budget,
                                     beam_width=cfg.beam_width, max_evaluations=sh, direction=direction))
    if progress:
        progress.update(task, completed=total)
        scorer.on_evaluation = None
    budget = {"eval_budget": cfg.eval_budget, "removals": list(alloc), "needs": needs, "shares": shares,
              "why": ("every segment's preferred search (exhaustive or beam) fits" if shares == needs else
                      "the preferred searches need more than the budget: each segment gets the evaluations that "
                      "score each of its units once, and the rest is shared out (small needs in full, the big "
                      "segments equally) for a shortlist greedy search inside them")}
    return out, budget
