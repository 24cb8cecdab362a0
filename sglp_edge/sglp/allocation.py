"""How many removals each SGLP segment takes, and how a global evaluation budget is shared over the
segments' searches (used by :mod:`sglp_edge.sglp.selection`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from benchmarks.board.errors import UserError


def split_budget(needs: Sequence[int], minimums: Sequence[int], budget: int | None) -> list[int]:
    """Split a global evaluation budget over segments: each gets what its preferred search needs
    when everything fits; otherwise each gets its minimum and the rest is water-filled (segments
    that need little get all of it, the others share what remains equally)."""
    if budget is None or sum(needs) <= budget:
        return list(needs)
    if sum(minimums) > budget:
        raise UserError(f"--eval-budget {budget} is below the {sum(minimums)} GradNorm evaluations that scoring "
                        f"every removable unit once needs; raise it to at least {sum(minimums)} or use fewer "
                        "segments (--k)")
    share = list(minimums)
    rest = budget - sum(minimums)
    extra = [(nd - mn, i) for i, (nd, mn) in enumerate(zip(needs, minimums)) if nd > mn]
    extra.sort()
    for j, (e, i) in enumerate(extra):
        give = min(e, rest // (len(extra) - j))
        share[i] += give
        rest -= give
    return share


def _cannot_place(n_remove: int, caps: Sequence[int], n_units: int) -> str:
    return (f"cannot remove {n_remove} units while keeping one unit per segment (at most {sum(caps)} with "
            f"{len(caps)} segments); use --keep {n_units - sum(caps)} or more, or fewer segments (--k)")


def allocate_removals_by_redundancy(segments: Sequence[Sequence[int]], removable: Sequence[bool],
                                   redundancy: Sequence[float], n_remove: int) -> list[int]:
    """Split a global number of removals over segments by where the redundant units are: take the
    removable units in order of decreasing ``redundancy`` (the CKA between a unit's output and the
    one before it: how little the unit changes the representation; ties -> the later unit) and give
    each unit's segment one removal, skipping a segment once only one of its units would be left.
    ``segments`` holds each segment's unit indices. Which units go is still GradNorm's choice inside
    each segment; this only sets how many per segment."""
    caps = [min(sum(1 for i in seg if removable[i]), len(seg) - 1) for seg in segments]
    if n_remove > sum(caps):
        raise UserError(_cannot_place(n_remove, caps, sum(len(seg) for seg in segments)))
    seg_of = {i: si for si, seg in enumerate(segments) for i in seg}
    alloc = [0] * len(segments)
    for i in sorted((i for i in seg_of if removable[i]), key=lambda i: (-float(redundancy[i]), -i)):
        if sum(alloc) >= n_remove:
            break
        si = seg_of[i]
        if alloc[si] < caps[si]:
            alloc[si] += 1
    return alloc


def adjacent_redundancy(cka: Any) -> list[float]:
    """Per unit, the CKA between its output and the previous unit's output (the first unit, whose
    input is not captured, takes its CKA with the second)."""
    n = len(cka)
    if n < 2:
        return [0.0] * n
    return [float(cka[i - 1][i]) if i else float(cka[0][1]) for i in range(n)]


def allocate_removals(segment_removables: Sequence[int], segment_sizes: Sequence[int], n_remove: int,
                      weights: Sequence[float] | None = None) -> list[int]:
    """Split a global number of removals over segments in proportion to their removable units
    (largest remainder), never emptying a segment (each keeps >= 1 unit, removable or not).
    ``weights`` (e.g. each segment's measured latency of its removable units) replace the counts
    as the proportions; the caps stay."""
    caps = [min(r, s - 1) for r, s in zip(segment_removables, segment_sizes)]
    if n_remove > sum(caps):
        raise UserError(_cannot_place(n_remove, caps, sum(segment_sizes)))
    w = [float(x) for x in (weights if weights is not None else segment_removables)]
    total = sum(w) or 1.0
    exact = [n_remove * r / total for r in w]
    alloc = [min(int(math.floor(e)), c) for e, c in zip(exact, caps)]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    while sum(alloc) < n_remove:
        progressed = False
        for i in order:
            if sum(alloc) >= n_remove:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
                progressed = True
        if not progressed:  # pragma: no cover - guarded by the cap check above
            break
    return alloc
