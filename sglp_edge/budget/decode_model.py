"""A decode-time model of a causal LM on one device: what each decoder layer costs per token.

At batch 1 a decoder's time per generated token is close to a line in its depth,
``ms_per_token(L) = a + b x L`` (``b`` one layer, ``a`` the embedding, final norm, LM head and the
loop), per runtime and precision: R^2 0.99 on SmolLM2 cut to 30 / 22 / 14 / 6 layers
(benchmarks/experiments/llm_decode_layers.py, benchmarks/results/lm-deploy.md "Decode time against
depth"). The prefill of the prompt (TTFT) follows the same form. Decoder layers of one model are
alike, so the depth is all that matters, not which layers are kept.

:mod:`sglp_edge.budget.decode_measure` times the real artifact of the model cut to a few depths on
the budget device at each precision searched and fits both lines here (with the full-depth artifact's
device perplexity, ``ppl_full``); :mod:`sglp_edge.budget.decode_search` predicts every (layer count,
precision) from them. This module is light (numpy only): the config check and the report use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

#: bumped when the measuring design changes (old cache entries then stop matching)
METHOD_VERSION = "decode-depths-2"


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """Least squares ``y = a + b x`` with ``a, b >= 0`` (a deeper model is never faster, and no
    time is negative; on a tiny model timing noise can tilt the free fit: then ``b = 0`` and ``a``
    the mean, or ``a = 0`` and the line through the origin, and ``clamped`` says so). Returns a, b,
    R^2 and the largest relative residual."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    clamped = False
    if len(set(x.tolist())) < 2:
        a, b = float(y.mean()), 0.0
    else:
        b, a = (float(v) for v in np.polyfit(x, y, 1))
        if b < 0:
            a, b, clamped = float(y.mean()), 0.0, True
        elif a < 0:
            a, b, clamped = 0.0, float((x * y).sum() / (x * x).sum()), True
    pred = a + b * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"a_ms": a, "b_ms": b, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "max_rel_residual": float(np.max(np.abs(y - pred) / y)) if len(y) else 0.0, "clamped": clamped}


@dataclass
class DecodeModel:
    """``ms_per_token(L) = decode.a_ms + decode.b_ms x L`` and ``ttft_ms(L) = ttft.a_ms + ttft.b_ms x L``
    for one model on one device (backend, precision, threads), with the timed points they rest on;
    one per precision searched."""

    n_layers: int
    precision: str
    decode: dict[str, Any]
    ttft: dict[str, Any]
    key: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)  # per depth: medians and every round's figures
    measure_s: float = 0.0
    cached: bool = False
    #: the full-depth artifact's perplexity on the device on the held-out blocks (q(p) of the joint choice)
    ppl_full: Optional[float] = None

    def ms_per_token(self, layers: int) -> float:
        return self.decode["a_ms"] + self.decode["b_ms"] * layers

    def tokens_per_s(self, layers: int) -> float:
        return 1000.0 / max(self.ms_per_token(layers), 1e-9)

    def ttft_ms(self, layers: int) -> float:
        return self.ttft["a_ms"] + self.ttft["b_ms"] * layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecodeModel":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def fit_points(n_layers: int, precision: str, points: list[dict[str, Any]], key: dict[str, Any],
               measure_s: float = 0.0) -> DecodeModel:
    """The two lines fitted to per-depth medians (``layers``, ``ms_per_token``, ``ttft_ms``)."""
    xs = [float(p["layers"]) for p in points]
    return DecodeModel(n_layers=n_layers, precision=precision, key=key, points=points, measure_s=measure_s,
                       decode=fit_line(xs, [p["ms_per_token"] for p in points]),
                       ttft=fit_line(xs, [p["ttft_ms"] for p in points]))


def timing_depths(n_layers: int) -> list[int]:
    """The depths timed for the fit: all layers, about 2/3 and about 1/3 (distinct, at least 1)."""
    return sorted({n_layers, max(1, round(2 * n_layers / 3)), max(1, round(n_layers / 3))}, reverse=True)
