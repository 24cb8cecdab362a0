"""Configuration, results and optimisation recipe of the training engine (:func:`sglp_edge.train.fit.fit`):
the budget / optimiser settings (:class:`LoopConfig`), what a run returns (:class:`FitResult`),
the warmup + cosine learning-rate schedule and the optimiser (the interruption exception is in
:mod:`sglp_edge.train.interrupted`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.board.errors import UserError


@dataclass
class LoopConfig:
    epochs: float | None = None
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 128  # global batch (split across DDP ranks)
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of the budget spent warming up linearly from lr*warmup_start
    warmup_start: float = 0.04
    final_lr_frac: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float | None = None
    seed: int = 0
    eval_batch_size: int = 256
    val_samples: int | None = None  # evaluate on the first N validation items only (quick runs); None: all
    ckpt_minutes: float = 5.0
    select_best: bool = True
    eval_test: bool = True
    log_every: int = 50
    threads: int | None = None
    device: str | None = None

    def check(self) -> None:
        given = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        if not given:
            raise UserError("give a training budget: --epochs N, --steps N or --minutes N")
        for k in given:
            if getattr(self, k) <= 0:
                raise UserError(f"--{k} must be positive, got {getattr(self, k)}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.val_samples is not None and self.val_samples < 1:
            raise UserError(f"--val-samples must be >= 1, got {self.val_samples}")
        if self.lr <= 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"warmup is a fraction of the budget in [0, 1), got {self.warmup}")


@dataclass
class FitResult:
    model: nn.Module  # the selected weights (best on val, or last), unwrapped from DDP
    val: dict[str, float]
    test: dict[str, float] | None
    history: list[dict[str, Any]]
    steps: int
    epochs: float
    train_seconds: float
    selected: str  # "best-val@epoch N" or "last"
    resumed_from_step: int = 0
    stopped_early: bool = False  # interrupted (state saved; resume to continue)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# learning-rate schedule
# ---------------------------------------------------------------------------------------------
def lr_at(progress: float, cfg: LoopConfig) -> float:
    """Linear warmup from ``lr*warmup_start`` to ``lr`` over the first ``warmup`` of the budget,
    then cosine down to ``lr*final_lr_frac`` at the end."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.warmup > 0 and p < cfg.warmup:
        return cfg.lr * (cfg.warmup_start + (1 - cfg.warmup_start) * p / cfg.warmup)
    q = (p - cfg.warmup) / max(1e-12, 1 - cfg.warmup)
    lo = cfg.lr * cfg.final_lr_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * q))


def make_optimizer(params, cfg: LoopConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)
