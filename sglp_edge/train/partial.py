"""Partial fine-tuning (Lu et al. 2024, "Reassessing Layer Pruning in LLMs"): after pruning, train
only the last ``n`` kept units and the head, and freeze the rest. For a decoder LM the head is the
final norm and the LM head (with tied embeddings, the shared embedding matrix trains as the LM
head); for a CNN, the layers after the last unit (pooling, classifier). Cheaper per step than a
full fine-tune, and it leaves the early layers exactly as pre-trained."""

from __future__ import annotations

from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter


def train_only_last(model: nn.Module, adapter: ModelAdapter, n: int) -> tuple[int, int]:
    """Freeze every parameter except those of the last ``n`` units and those registered after the
    last unit (the head), plus the output embeddings when the model has them. Returns (trainable,
    total) parameter counts."""
    units = adapter.units(model)
    if not 1 <= n <= len(units):
        raise UserError(f"--train-last {n}: the model has {len(units)} units; give 1..{len(units)}")
    prefixes = tuple(u.name + "." for u in units[-n:])
    last = units[-1].name + "."
    named = list(model.named_parameters())
    if not any(name.startswith(prefixes) for name, _ in named):
        raise UserError(f"cannot find the parameters of units {', '.join(p[:-1] for p in prefixes)} in the model")
    after = max((i for i, (name, _) in enumerate(named) if name.startswith(last)), default=len(named))
    for i, (name, p) in enumerate(named):
        p.requires_grad_(i > after or name.startswith(prefixes))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None:
        head.weight.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
