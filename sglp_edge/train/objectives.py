"""What the training engine (:func:`sglp_edge.train.fit.fit`) trains and how it is measured: the
:class:`Objective` protocol, plain classification, moving batches to a device, and (sharded) evaluation.

Not to be confused with :mod:`sglp_edge.tasks` (what a *pipeline* is for: image classification,
causal LM, ...)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sglp_edge.train.distributed import DistInfo, all_reduce


class Objective:
    """What is trained and how it is measured. ``train_loss`` returns the loss to minimise plus
    scalars to display; ``eval_sums`` returns additive sums over a batch, which
    ``finalize`` turns into metrics including ``score`` (higher is better, used for selection)."""

    def train_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        model.train()


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class ClassificationObjective(Objective):
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def train_loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, {"loss": float(loss.detach()), "acc": float((logits.argmax(1) == y).float().mean())}

    def eval_sums(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"n": float(len(y)), "correct": float((logits.argmax(1) == y).sum()),
                "loss_sum": float(nn.functional.cross_entropy(logits, y, reduction="sum"))}

    def finalize(self, sums):
        n = max(sums.get("n", 0.0), 1.0)
        acc = sums.get("correct", 0.0) / n
        return {"acc": acc, "loss": sums.get("loss_sum", 0.0) / n, "n": sums.get("n", 0.0), "score": acc}


def capped(dataset: Dataset | None, n: int | None) -> Dataset | None:
    """The first ``n`` items of ``dataset`` (deterministic), or the data set itself."""
    if dataset is None or n is None or len(dataset) <= n:
        return dataset
    return Subset(dataset, range(n))


@torch.no_grad()
def evaluate(model: nn.Module, task: Objective, dataset: Dataset, *, batch_size: int = 256,
             info: DistInfo | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset`` (eval mode). Under DDP each rank takes a strided shard
    and the sums are all-reduced, so every rank gets the full-set metrics."""
    info = info or DistInfo()
    was = model.training
    model.eval()
    idx = list(range(info.rank, len(dataset), info.world))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=idx, num_workers=0)
    sums: dict[str, float] = {}
    for batch in loader:
        for k, v in task.eval_sums(model, to_device(batch, info.device)).items():
            sums[k] = sums.get(k, 0.0) + v
    keys = sorted(sums) if sums else []
    if info.distributed:
        keys = _common_keys(keys, task, model, dataset, info)
        sums = dict(zip(keys, all_reduce([sums.get(k, 0.0) for k in keys], info)))
    model.train(was)
    return task.finalize(sums)


def _common_keys(keys, task, model, dataset, info):  # every rank needs the same key list
    if keys:
        return keys
    batch = next(iter(DataLoader(dataset, batch_size=1)))
    return sorted(task.eval_sums(model, to_device(batch, info.device)))
