"""Fisher optimal segmentation of the CKA reference sequence into contiguous layer segments.

* :func:`sequence_from_cka` turns the (L, L) CKA matrix into a 1-D sequence over the units.
* :func:`fisher_segments` cuts it into k contiguous non-empty segments minimising the total
  within-segment sum of squares (Fisher 1958): D(a, b) = sum_{a<=t<b} (x_t - mean(x[a:b]))^2,
  L(b, 1) = D(0, b), L(b, k) = min_j L(j, k-1) + D(j, b). Exact dynamic programming with the
  argmins stored (the reference code backtracked greedily and missed the optimum), O(k n^2)
  with prefix sums, vectorised over the end point.
* :func:`choose_k` picks k automatically by a rule that can stop (documented there).

Segments are half-open unit-index ranges ``(start, end)``, in order, covering 0..n.
"""

from __future__ import annotations

import numpy as np

from benchmarks.board.errors import UserError

SEQUENCE_MODES = ("colsum", "adjacent")
K_RULES = ("elbow", "threshold")


def _as_sequence(x: np.ndarray | list[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise UserError(f"segmentation needs a non-empty 1-D sequence, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise UserError("the sequence to segment contains NaN or inf; check the CKA matrix")
    return a


def sequence_from_cka(cka: np.ndarray, mode: str = "colsum") -> np.ndarray:
    """The reference sequence over units from a CKA matrix.

    ``"colsum"`` (default, as in the SGLP paper): x_j = sum_i CKA[i, j], how similar unit j is to
    the whole network. ``"adjacent"``: x_j = CKA[j, j+1], similarity to the next unit; the last
    unit, which has no next, takes its similarity to the previous one (x_{L-1} = CKA[L-2, L-1])."""
    if mode not in SEQUENCE_MODES:
        raise UserError(f"unknown sequence mode {mode!r}; choose one of {', '.join(SEQUENCE_MODES)}")
    c = np.asarray(cka, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise UserError(f"the CKA matrix must be square (units x units), got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise UserError("the CKA matrix contains NaN or inf")
    if mode == "colsum":
        return c.sum(axis=0)
    n = c.shape[0]
    if n == 1:
        return np.ones(1)
    nxt = np.array([c[j, j + 1] for j in range(n - 1)])
    return np.append(nxt, c[n - 2, n - 1])


def _cost_matrix(x: np.ndarray) -> np.ndarray:
    """D[a, b] = within-segment sum of squares of x[a:b] (inf where b <= a), shape (n+1, n+1)."""
    n = x.size
    xc = x - x.mean()  # prefix sums of centred data: less cancellation
    s1 = np.concatenate([[0.0], np.cumsum(xc)])
    s2 = np.concatenate([[0.0], np.cumsum(xc * xc)])
    a = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    m = (b - a).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        D = (s2[b] - s2[a]) - (s1[b] - s1[a]) ** 2 / m
    D = np.maximum(D, 0.0)
    D[m <= 0] = np.inf
    return D


def _fisher_dp(x: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """loss[k, b] = optimal loss of x[:b] in k segments; arg[k, b] = start of the last segment."""
    n = x.size
    D = _cost_matrix(x)
    loss = np.full((k_max + 1, n + 1), np.inf)
    arg = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    loss[1] = D[0]
    for k in range(2, k_max + 1):
        M = loss[k - 1][:, None] + D  # M[j, b] = L(j, k-1) + D(j, b)
        arg[k] = np.argmin(M, axis=0)  # first minimiser: deterministic tie-breaking
        loss[k] = M[arg[k], np.arange(n + 1)]
    return loss, arg


def _check_k(k: int, n: int, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"{what} must be an integer between 1 and the number of units ({n}), got {k!r}")
    if not 1 <= int(k) <= n:
        raise UserError(f"{what}={k} segments is impossible for {n} units; choose {what} between 1 and {n}")
    return int(k)


def fisher_segments(x: np.ndarray | list[float], k: int) -> list[tuple[int, int]]:
    """Exact Fisher optimal segmentation of ``x`` into ``k`` contiguous non-empty segments,
    as half-open ranges [(0, e1), (e1, e2), ..., (e_{k-1}, n)]."""
    a = _as_sequence(x)
    n = a.size
    k = _check_k(k, n)
    _, arg = _fisher_dp(a, k)
    segs: list[tuple[int, int]] = []
    end = n
    for kk in range(k, 1, -1):
        start = int(arg[kk, end])
        segs.append((start, end))
        end = start
    segs.append((0, end))
    return segs[::-1]


def segmentation_loss(x: np.ndarray | list[float], segments: list[tuple[int, int]]) -> float:
    """Total within-segment sum of squares of a segmentation."""
    a = _as_sequence(x)
    return float(sum(((a[s:e] - a[s:e].mean()) ** 2).sum() for s, e in segments))


def fisher_loss_table(x: np.ndarray | list[float], k_max: int) -> np.ndarray:
    """Optimal total loss for k = 1..k_max segments (entry k-1); non-increasing in k."""
    a = _as_sequence(x)
    k_max = _check_k(k_max, a.size, "k_max")
    loss, _ = _fisher_dp(a, k_max)
    return loss[1:, a.size].copy()


def default_k_max(n: int) -> int:
    """min(10, n // 2), at least 1."""
    return max(1, min(10, n // 2))


def elbow_curve(x: np.ndarray | list[float], k_max: int | None = None) -> dict[str, list[float]]:
    """The curve :func:`choose_k`'s elbow rule reads, for the record: the optimal loss L(k) for
    k = 1..k_max and each k's distance below the normalised chord (the elbow rule takes the
    largest; all zero when the curve has no span)."""
    a = _as_sequence(x)
    k_max = default_k_max(a.size) if k_max is None else _check_k(k_max, a.size, "k_max")
    L = fisher_loss_table(a, k_max)
    span = L[0] - L[-1]
    if k_max < 2 or span <= 1e-12 * max(L[0], np.finfo(float).tiny):
        dist = np.zeros(k_max)
    else:
        dist = 1.0 - np.arange(k_max) / (k_max - 1) - (L - L[-1]) / span
    return {"loss_by_k": [float(v) for v in L], "elbow_distance_by_k": [float(v) for v in dist]}


def choose_k(x: np.ndarray | list[float], k_max: int | None = None, rule: str = "elbow",
             frac: float = 0.1) -> int:
    """Choose the number of segments from the optimal loss curve L(1..k_max).

    Both rules can stop well before the cap (unlike the reference "largest k whose relative
    loss drop exceeds 5 %", which nearly always returns the cap):

    * ``"elbow"`` (default): normalise the curve to u = (k-1)/(k_max-1), v = (L(k) - L(k_max)) /
      (L(1) - L(k_max)) and return the k farthest below the chord from (0, 1) to (1, 0), i.e. the
      argmax of 1 - u - v (first one on ties). For a sequence of m clear plateaus this is m. If no
      point lies below the chord (no elbow: the loss falls linearly or not at all) it returns 1.
      With k_max < 3 there is no interior point and the ``"threshold"`` rule is used.
    * ``"threshold"``: the smallest k with L(k) <= frac * L(1) (k_max when none is).

    A sequence that is constant (L(1) ~ 0 relative to its magnitude) gets k = 1.
    ``k_max`` defaults to min(10, n // 2)."""
    a = _as_sequence(x)
    n = a.size
    if rule not in K_RULES:
        raise UserError(f"unknown k rule {rule!r}; choose one of {', '.join(K_RULES)} or fix k yourself")
    if not 0.0 < frac < 1.0:
        raise UserError(f"frac must be between 0 and 1, got {frac}")
    k_max = default_k_max(n) if k_max is None else _check_k(k_max, n, "k_max")
    L = fisher_loss_table(a, k_max)
    scale = max(float(np.abs(a).max()) ** 2 * n, np.finfo(float).tiny)
    if k_max == 1 or L[0] <= 1e-12 * scale:
        return 1
    if rule == "threshold" or k_max < 3:
        hit = np.nonzero(L <= frac * L[0])[0]
        return int(hit[0]) + 1 if hit.size else k_max
    span = L[0] - L[-1]
    if span <= 1e-12 * L[0]:
        return 1
    u = np.arange(k_max) / (k_max - 1)
    v = (L - L[-1]) / span
    dist = 1.0 - u - v
    best = int(np.argmax(dist))
    return best + 1 if dist[best] > 1e-12 else 1
