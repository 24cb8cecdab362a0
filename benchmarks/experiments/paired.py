"""The ratio of two things' latency on a noisy machine (standard library only).

A shared 2-core machine drifts by tens of percent over a minute, so two figures measured one after
the other give a ratio that moves with the drift, not with the models. Here ``A`` and ``B`` are
timed in alternating passes (A B, B A, A B, ...), each pass gives one ratio ``A / B`` from figures
taken seconds apart, and the result is the **median of the per-pass ratios**, with their spread and
the load average before and after. A ratio above its physical limit (a depth-pruned network's
speedup above its MACs ratio, a decode speedup above the layer ratio) cannot be a result: it is a
measuring fault, re-measured, and raised as :class:`MeasuringFault` if it persists.

    from benchmarks.experiments.paired import paired_ratio
    r = paired_ratio(lambda: p50(original), lambda: p50(pruned), passes=12, limit=macs_ratio)
    r["ratio"], r["spread"], r["loadavg"]

Used by ``benchmarks/experiments/speedup.py``, ``benchmarks/experiments/harness_fidelity.py``, ``benchmarks/experiments/llm_deploy.py``
and ``benchmarks/experiments/llm_decode_layers.py``.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Callable, Dict, List, Optional

#: how far above its limit a median may sit before it counts as a measuring fault (timer resolution
#: and a model's fixed costs make a ratio land a hair over its ideal without being wrong)
TOLERANCE = 0.02


class MeasuringFault(Exception):
    """A ratio stayed above its physical limit after re-measuring: the machine, not the model."""

    def __init__(self, message: str, attempts: List[Dict[str, Any]]):
        super().__init__(message)
        self.attempts = attempts


def loadavg() -> Optional[float]:
    """The one-minute load average, None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def summarize(ratios: List[float]) -> Dict[str, Any]:
    """Median, spread (min, max) and inter-quartile range of per-pass ratios."""
    s = sorted(ratios)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"ratio": statistics.median(s), "spread": [s[0], s[-1]], "iqr": [q[0], q[2]], "passes": len(s)}


def alternating(time_a: Callable[[], float], time_b: Callable[[], float], passes: int,
                log: Optional[Callable[[str], None]] = None, label: str = "") -> Dict[str, Any]:
    """``passes`` alternating passes (A B, B A, ...): per pass both figures and their ratio A / B."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1 (got {passes})")
    a_s: List[float] = []
    b_s: List[float] = []
    ratios: List[float] = []
    before = loadavg()
    for p in range(passes):
        if p % 2 == 0:
            a = time_a()
            b = time_b()
        else:
            b = time_b()
            a = time_a()
        if not (a > 0 and b > 0):
            raise ValueError(f"a timing must be > 0 (got {a}, {b})")
        a_s.append(a)
        b_s.append(b)
        ratios.append(a / b)
        if log:
            log(f"{label}pass {p + 1}/{passes}: {a:.4g} / {b:.4g} = {a / b:.3f}")
    return {**summarize(ratios), "rounds_ratio": ratios, "rounds_a": a_s, "rounds_b": b_s,
            "a": statistics.median(a_s), "b": statistics.median(b_s), "loadavg": [before, loadavg()]}


def alternating_rounds(timers: Dict[Any, Callable[[], float]], rounds: int,
                       log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Several things timed in the same rounds, the order reversed every round (the many-armed form
    of :func:`alternating`): ``{"per": {name: [one figure per round]}, "loadavg": [before, after]}``.
    Read a ratio from it with :func:`ratio_of` (per-round ratios, so a drift moves both alike)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (got {rounds})")
    names = list(timers)
    per: Dict[Any, List[float]] = {n: [] for n in names}
    before = loadavg()
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            per[n].append(float(timers[n]()))
        if log:
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {per[n][-1]:.4g}" for n in names))
    return {"per": per, "loadavg": [before, loadavg()]}


def ratio_of(rounds: Dict[str, Any], a: Any, b: Any, limit: Optional[float] = None,
             tolerance: float = TOLERANCE) -> Dict[str, Any]:
    """Median of the per-round ratios a / b of :func:`alternating_rounds`, with spread and IQR;
    ``fault`` is True where it sits above ``limit`` (a measuring fault, never a result)."""
    ratios = [x / y for x, y in zip(rounds["per"][a], rounds["per"][b])]
    rec = {**summarize(ratios), "rounds_ratio": ratios, "loadavg": rounds["loadavg"], "limit": limit}
    rec["fault"] = limit is not None and rec["ratio"] > limit * (1 + tolerance)
    return rec


def paired_ratio(time_a: Callable[[], float], time_b: Callable[[], float], *, passes: int = 12,
                 limit: Optional[float] = None, retries: int = 2, tolerance: float = TOLERANCE,
                 log: Optional[Callable[[str], None]] = None, label: str = "") -> Dict[str, Any]:
    """The median ratio A / B over alternating passes; re-measured while it sits above ``limit``.

    Returns the accepted attempt's record (``ratio``, ``spread``, ``iqr``, ``rounds_ratio``,
    ``loadavg`` [before, after], ``a``/``b`` medians, ``limit``) with ``faults``: the rejected
    attempts. Raises :class:`MeasuringFault` when every attempt stayed above the limit."""
    faults: List[Dict[str, Any]] = []
    for attempt in range(retries + 1):
        rec = alternating(time_a, time_b, passes, log, label)
        rec.update(limit=limit, attempt=attempt + 1)
        if limit is None or rec["ratio"] <= limit * (1 + tolerance):
            rec["faults"] = faults
            return rec
        faults.append(rec)
        if log:
            log(f"{label}measuring fault: ratio {rec['ratio']:.3f} is above its physical limit {limit:.3f} "
                f"(load average {rec['loadavg']}); measuring again")
    seen = ", ".join("%.3f" % f["ratio"] for f in faults)
    raise MeasuringFault(f"{label}the ratio stayed above its physical limit {limit:.3f} in {retries + 1} attempts "
                         f"({seen}): the machine is too busy to measure; rerun it alone", faults)
