"""How long the SGLP analysis will take, said before it starts.

From the model's shape: the MACs of one calibration example (torch's FLOP counter on one example,
scaled to the batch), the number of forwards the analysis runs (one per CKA batch, then up to
``--eval-budget`` candidate evaluations, each a forward (``loss``: over the segment and what
follows it when the prefix is replayed, about 0.6 of the network on average) or a forward and a
backward (GradNorm, about 3 forwards)) and the speed of the chosen device, measured on a matmul of
the model's width for a fraction of a second. The result is an estimate: it is printed, recorded
in ``plan.json`` (``estimate``) and compared with the measured time there."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sglp_edge.models.base import ModelAdapter
from sglp_edge.sglp.accelerator import Placement
from sglp_edge.sglp.prune import count_macs

# measured on this project's 2-core CPU: a decoder forward reaches about this share of a plain matmul's rate
MODEL_EFFICIENCY = 0.6
PREFIX_SHARE = 0.6  # the average share of the network a candidate runs with its segment's prefix replayed
GRADNORM_FORWARDS = 3.0  # forward + backward


def matmul_rate(placement: Placement, width: int = 1024, rows: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of a (rows x width) @ (width x 4 width) matmul on the placement's device and dtype."""
    dev, dt = placement.device, placement.dtype
    a = torch.randn(rows, width, device=dev, dtype=dt)
    b = torch.randn(width, 4 * width, device=dev, dtype=dt)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        sync()
        dt_s = time.perf_counter() - t0
        if dt_s >= seconds or n >= 200:
            break
    return 2.0 * rows * width * 4 * width * n / dt_s


@dataclass
class AnalysisEstimate:
    device: str
    flops_per_s: float  # measured matmul rate x MODEL_EFFICIENCY
    cka_forwards: int
    macs_per_cka_batch: float
    max_evaluations: Optional[int]  # None: unbounded --eval-budget
    forwards_per_evaluation: float
    macs_per_evaluation_batch: float
    grad_batches: int
    seconds: Optional[float]  # None when the evaluation count is unbounded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        ev = (f"up to {self.max_evaluations} candidate evaluations" if self.max_evaluations is not None
              else "an unbounded candidate search (--eval-budget 0)")
        took = f"about {_minutes(self.seconds)}" if self.seconds is not None else "CKA " + _minutes(self._cka_s())
        return (f"analysis estimate on {self.device} (~{self.flops_per_s / 1e9:.0f} GFLOP/s): CKA over "
                f"{self.cka_forwards} batches + {ev}: {took}")

    def _cka_s(self) -> float:
        return 2.0 * self.macs_per_cka_batch * self.cka_forwards / self.flops_per_s


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _examples(batch: Any) -> tuple[Any, int]:
    """One example of ``batch`` and the number of examples in it."""
    if isinstance(batch, (tuple, list)):
        return (batch[0][:1],) + tuple(batch[1:]), int(batch[0].shape[0])
    if isinstance(batch, dict):
        return {k: v[:1] for k, v in batch.items()}, int(batch["input_ids"].shape[0])
    return batch[:1], int(batch.shape[0])


def estimate_analysis(model: nn.Module, adapter: ModelAdapter, placement: Placement, cka_batches: Sequence[Any],
                      grad_batches: Sequence[Any], *, protocol: str, eval_budget: Optional[int],
                      prefix_cache: bool = True, width: Optional[int] = None) -> AnalysisEstimate:
    """The estimate for one analysis (``protocol`` already resolved: loss / natural / reference / healed)."""
    one, n_cka = _examples(cka_batches[0])
    macs_one, _ = count_macs(model, adapter, one)
    _, n_grad = _examples(grad_batches[0])
    h = width or int(getattr(getattr(model, "config", None), "hidden_size", 0) or 1024)
    rate = matmul_rate(placement, width=max(256, min(h, 4096))) * MODEL_EFFICIENCY
    per_eval = GRADNORM_FORWARDS if protocol in ("natural", "reference") else 1.0
    if protocol == "loss" and prefix_cache:
        per_eval *= PREFIX_SHARE
    if protocol == "healed":
        per_eval *= 2.0  # the fit's forward, then the healed candidate's
    cka_s = 2.0 * macs_one * n_cka * len(cka_batches) / rate
    ev_s = None if eval_budget is None else 2.0 * macs_one * n_grad * len(grad_batches) * per_eval * eval_budget / rate
    return AnalysisEstimate(str(placement.device), rate, len(cka_batches), float(macs_one * n_cka), eval_budget,
                            per_eval, float(macs_one * n_grad), len(grad_batches),
                            None if ev_s is None else cka_s + ev_s)
