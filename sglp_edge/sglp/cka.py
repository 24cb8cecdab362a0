"""Linear CKA between layer units: a direct full-batch version and a minibatch accumulator.

Definitions (all computations in float64)
-----------------------------------------
For example-by-feature matrices X (n, d1) and Y (n, d2), with linear Grams K = X X^T, L = Y Y^T,

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L)).

* **biased** (Kornblith et al. 2019, the classic formula): HSIC_0(K, L) = tr(K H L H) / (n-1)^2
  with H the centring matrix; equivalently ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)
  for column-centred features. Computed here through the n x n Grams (cheaper when d >> n).
* **unbiased** (Song et al. 2012; used for minibatch CKA by Nguyen, Raghu & Kornblith 2021):
  with K~, L~ the Grams with zeroed diagonal,
  HSIC_1 = [tr(K~L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K~ L~ 1] / (n(n-3)),
  which needs n >= 4. ``linear_cka(..., unbiased=True)`` evaluates this formula literally.

Minibatch CKA (:class:`MinibatchCKA`)
-------------------------------------
CKA_ij = sum_b HSIC_1(K_i^b, K_j^b) / sqrt(sum_b HSIC_1(K_i^b, K_i^b) * sum_b HSIC_1(K_j^b, K_j^b)),
summed over minibatches b; no full-dataset Gram is ever formed. HSIC_1 is evaluated as the inner
product of *U-centred* Grams (Szekely & Rizzo 2014): U(K)_ij = K~_ij - r_i/(n-2) - r_j/(n-2)
+ s/((n-1)(n-2)) off the diagonal, 0 on it (r = row sums of K~, s = total sum), so that
HSIC_1(K, L) = <U(K), U(L)> / (n(n-3)). Stacking the L U-centred Grams of a batch as an
(L, n^2) matrix gives all L x L HSIC values with a single matmul. Features are column-centred
before the Gram (HSIC_1 is translation invariant; centring only improves the float64 accuracy).
Because the accumulated HSIC values are sums of inner products with positive weights, Cauchy-
Schwarz keeps |CKA| <= 1; unbiased CKA can be (slightly) negative for unrelated units.

Memory per update: one Gram of n x n float64 per unit, i.e. 8 * L * n^2 bytes (ResNet-56, L = 28,
n = 128: 3.7 MB), plus a float64 copy of one unit's output at a time (the outputs are converted
unit by unit, not all at once). Rows beyond ``max_rows`` are split into consecutive chunks that each count as
a minibatch of the estimator, which bounds memory at 8 * L * max_rows^2 bytes (L = 40,
max_rows = 1024: 335 MB).

Degenerate units. A unit whose output does not vary over the examples (a dead ReLU block,
a constant) has HSIC_1(K, K) = 0 and CKA is 0/0. We define CKA = 0 between a degenerate unit and
any other unit and 1 on the diagonal (it carries no information about the examples, so it is
similar to nothing); :attr:`MinibatchCKA.degenerate` lists such units. A unit is degenerate when
its accumulated self-HSIC is <= 1e-24 times the accumulated squared mean squared row norm of its
raw features (float64 round-off of a constant is ~1e-32 of that). ``linear_cka`` returns 0.0
when either input is degenerate.

Shapes: conv outputs (n, C, H, W) and anything with 4+ dims are flattened per example to
(n, C*H*W). Hidden states (B, T, H) of language models (and ViTs) depend on ``mode``:

* ``"tokens"`` (default): every token position is an example, (B*T, H). This is what is stable
  for LLM hidden states: the Gram is (B*T)^2, so memory is bounded by the tokens per batch (and
  by ``max_rows``), not by sequence length times width. An optional ``mask`` (B, T) (e.g. the
  attention mask) keeps only real tokens.
* ``"sequence"``: every sequence is an example, (B, T*H); needs many sequences per batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from benchmarks.board.errors import UserError

MODES = ("tokens", "sequence")
_DEGENERATE_RTOL = 1e-24


def _flatten(t: torch.Tensor, mode: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Examples-by-features view of one unit output, in its own dtype and device (no copy when
    a reshape suffices)."""
    if mode not in MODES:
        raise UserError(f"unknown CKA mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    t = t.detach()
    if t.dim() == 0:
        raise UserError("a unit output is a scalar; CKA needs one row per example")
    if t.dim() == 1:
        return t.reshape(-1, 1)
    if t.dim() == 3 and mode == "tokens":
        if mask is not None:
            mask = torch.as_tensor(mask)
            if tuple(mask.shape) != tuple(t.shape[:2]):
                raise UserError(f"token mask has shape {tuple(mask.shape)} but hidden states are "
                                f"{tuple(t.shape)}; pass the (batch, tokens) attention mask")
            return t[mask.to(t.device).bool()]
        return t.reshape(-1, t.shape[-1])
    return t.reshape(t.shape[0], -1)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(device="cpu", dtype=torch.float64, copy=True)  # always a fresh tensor


def flatten_for_cka(t: torch.Tensor, mode: str = "tokens", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Examples-by-features float64 copy of one unit output (see the module docstring).

    (n,) -> (n, 1); (n, d) unchanged; (B, T, H) -> (B*T, H) in ``"tokens"`` mode (rows where
    ``mask`` (B, T) is nonzero only) or (B, T*H) in ``"sequence"`` mode; 4+ dims -> (n, -1)."""
    return _f64(_flatten(t, mode, mask))


def _as_2d(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.dim() == 1:
        t = t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1)


def _degenerate(self_hsic: float, ref: float) -> bool:
    return not self_hsic > _DEGENERATE_RTOL * ref


def _ref_scale(X: torch.Tensor) -> float:
    """Squared mean squared row norm of the raw features: the scale of a Gram entry, squared."""
    return float((X * X).sum(dim=1).mean()) ** 2


def _hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC, evaluated literally (n >= 4)."""
    n = K.shape[0]
    K = K.clone()
    L = L.clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=K.dtype)
    trace = float((K * L).sum())  # tr(K~ L~) for symmetric matrices
    sums = float(K.sum()) * float(L.sum()) / ((n - 1) * (n - 2))
    cross = float((one.T @ K @ L @ one).squeeze()) * 2.0 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def _hsic_biased(Kc: torch.Tensor, Lc: torch.Tensor) -> float:
    """tr(K H L H) / (n-1)^2 for Grams of column-centred features (then H K H = K)."""
    n = Kc.shape[0]
    return float((Kc * Lc).sum()) / (n - 1) ** 2


def linear_cka(X: torch.Tensor | np.ndarray, Y: torch.Tensor | np.ndarray, unbiased: bool = False) -> float:
    """Linear CKA of two representations of the same n examples, computed on the full batch.

    X: (n, d1), Y: (n, d2) (more dims are flattened per example). ``unbiased=False`` is the
    classic Kornblith et al. formula; ``unbiased=True`` uses the unbiased HSIC estimator of
    Song et al. 2012 and needs n >= 4. Returns 0.0 when either input does not vary over examples."""
    Xt, Yt = _as_2d(X), _as_2d(Y)
    n = Xt.shape[0]
    if Yt.shape[0] != n:
        raise UserError(f"CKA needs the same examples in both inputs; got {n} and {Yt.shape[0]} rows")
    if n < (4 if unbiased else 2):
        raise UserError(f"CKA needs at least {4 if unbiased else 2} examples (got {n}); use a larger batch")
    Xc, Yc = Xt - Xt.mean(0), Yt - Yt.mean(0)
    K, L = Xc @ Xc.T, Yc @ Yc.T  # already double-centred: H K H = K
    hsic = _hsic_unbiased if unbiased else _hsic_biased
    kl, kk, ll = hsic(K, L), hsic(K, K), hsic(L, L)
    if _degenerate(kk, _ref_scale(Xt)) or _degenerate(ll, _ref_scale(Yt)):
        return 0.0
    return float(np.clip(kl / math.sqrt(kk * ll), -1.0, 1.0))


def _u_centre(K: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """U-centred Gram(s), batched over leading dims: HSIC_1(K, L) = <U(K), U(L)> / (n(n-3))."""
    n = K.shape[-1]
    if not inplace:
        K = K.clone()
    K.diagonal(dim1=-2, dim2=-1).zero_()
    r = K.sum(-1)  # (..., n): row sums == column sums (symmetric)
    s = r.sum(-1)  # (...)
    K -= r.unsqueeze(-1) / (n - 2)
    K -= r.unsqueeze(-2) / (n - 2)
    K += (s / ((n - 1) * (n - 2)))[..., None, None]
    K.diagonal(dim1=-2, dim2=-1).zero_()
    return K


class MinibatchCKA:
    """Accumulates unbiased linear CKA between ``n_units`` units over minibatches.

    >>> acc = MinibatchCKA(len(units))
    >>> for batch in batches:
    ...     acc.update(capture_unit_outputs(adapter, model, units, batch))
    >>> cka = acc.compute()  # (L, L) numpy float64, symmetric, diagonal 1

    ``mode`` decides how (B, T, H) hidden states become examples (module docstring);
    ``max_rows`` caps the rows per Gram (larger batches are split into chunks)."""

    def __init__(self, n_units: int, mode: str = "tokens", max_rows: int | None = 1024):
        if int(n_units) < 1:
            raise UserError(f"MinibatchCKA needs at least one unit, got n_units={n_units}")
        if mode not in MODES:
            raise UserError(f"unknown CKA mode {mode!r}; choose one of {', '.join(MODES)}")
        if max_rows is not None and max_rows < 4:
            raise UserError(f"max_rows must be at least 4 (unbiased HSIC needs 4 examples), got {max_rows}")
        self.n_units = int(n_units)
        self.mode = mode
        self.max_rows = max_rows
        self.n_batches = 0  # update() calls
        self.n_chunks = 0  # minibatches of the estimator (> n_batches when batches were split)
        self.n_examples = 0
        self._hsic = torch.zeros(self.n_units, self.n_units, dtype=torch.float64)
        self._ref = torch.zeros(self.n_units, dtype=torch.float64)

    def update(self, feats: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Add one minibatch: ``feats[i]`` is unit i's output for the same examples."""
        if len(feats) != self.n_units:
            raise UserError(f"expected outputs of {self.n_units} units, got {len(feats)}")
        rows = [_flatten(f, self.mode, mask) for f in feats]  # views in the outputs' own dtype
        n = rows[0].shape[0]
        bad = [i for i, r in enumerate(rows) if r.shape[0] != n]
        if bad:
            raise UserError(f"unit outputs disagree on the number of examples ({n} vs {rows[bad[0]].shape[0]} "
                            f"for unit {bad[0]}); give every unit's output for the same minibatch")
        if n < 4:
            raise UserError(f"minibatch CKA needs at least 4 examples per batch, got {n}; use a larger batch")
        n_chunks = 1 if self.max_rows is None else math.ceil(n / self.max_rows)
        if n_chunks > 1 and n // n_chunks < 4:  # pragma: no cover - max_rows >= 4 makes this impossible
            n_chunks = n // 4
        bounds = np.linspace(0, n, n_chunks + 1).round().astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            self._add_chunk([r[a:b] for r in rows])
        self.n_batches += 1
        self.n_examples += n

    def _add_chunk(self, rows: list[torch.Tensor]) -> None:
        # one unit at a time in float64: peak memory is the L Grams plus one unit's chunk
        n = rows[0].shape[0]
        grams = torch.empty(self.n_units, n, n, dtype=torch.float64)
        for i, R in enumerate(rows):
            X = _f64(R)
            mu = X.mean(0)
            X.sub_(mu)
            torch.matmul(X, X.T, out=grams[i])
            # ||X||_F^2 = ||X - mu||_F^2 + n ||mu||^2: the raw-feature scale without another pass
            self._ref[i] += ((grams[i].trace() + n * mu.dot(mu)) / n) ** 2
        U = _u_centre(grams, inplace=True).reshape(self.n_units, n * n)
        self._hsic += (U @ U.T) / (n * (n - 3))
        self.n_chunks += 1

    @property
    def hsic(self) -> np.ndarray:
        """Accumulated sum of unbiased HSIC values, (L, L)."""
        return self._hsic.numpy().copy()

    @property
    def degenerate(self) -> list[int]:
        """Indices of units whose output did not vary over the examples seen so far."""
        d = self._hsic.diagonal()
        return [i for i in range(self.n_units) if _degenerate(float(d[i]), float(self._ref[i]))]

    def compute(self) -> np.ndarray:
        """(L, L) CKA matrix: symmetric, diagonal 1, 0 next to degenerate units."""
        if self.n_batches == 0:
            raise UserError("no minibatch was added to the CKA accumulator; give at least one calibration batch")
        h = self._hsic.numpy()
        d = np.diag(h).copy()
        deg = np.zeros(self.n_units, dtype=bool)
        deg[self.degenerate] = True
        safe = np.where(deg, 1.0, d)
        cka = h / np.sqrt(np.outer(safe, safe))
        cka[deg, :] = 0.0
        cka[:, deg] = 0.0
        cka = np.clip((cka + cka.T) / 2.0, -1.0, 1.0)
        np.fill_diagonal(cka, 1.0)
        return cka
