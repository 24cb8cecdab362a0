"""Knowledge-distillation building blocks of the recovery fine-tune (:mod:`sglp_edge.train.finetune`):
the KD loss on logits, the map from each kept unit of a pruned student to the teacher unit it came
from, and the forward hooks that collect unit outputs for feature distillation."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, get_module


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            T: float = 4.0, alpha: float = 0.9, ignore_index: int = -100) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``.

    Logits may have any leading shape; the last dimension is the classes (vocabulary). The KL is
    summed over classes and averaged over rows ("batchmean"), counting only rows whose label is
    not ``ignore_index``. ``labels=None`` (or ``alpha=1``) gives pure distillation."""
    if T <= 0:
        raise UserError(f"KD temperature must be positive, got {T}")
    if not 0 <= alpha <= 1:
        raise UserError(f"KD weight alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                        f"{tuple(teacher_logits.shape)}; the pruned model must keep the original's outputs")
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c).float()
    t = teacher_logits.reshape(-1, c).float().detach()
    mask = None
    if labels is not None:
        labels = labels.reshape(-1)
        mask = labels != ignore_index
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    kl_rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kl = kl_rows[mask].mean() if mask is not None else kl_rows.mean()
    loss = alpha * (T * T) * kl
    if labels is not None and alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, labels, ignore_index=ignore_index)
    return loss


# ---------------------------------------------------------------------------------------------
# unit mapping for feature distillation
# ---------------------------------------------------------------------------------------------
def kept_unit_map(teacher: nn.Module, adapter: ModelAdapter,
                  removed: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, str]:
    """{student module path: teacher module path} for every unit of ``teacher`` that survives the
    removal of ``removed`` (one round of original unit names, or a list of rounds as stored in a
    checkpoint). Children removed from a Sequential/ModuleList shift the later ones down, as
    :func:`sglp_edge.models.base.drop_modules` does."""
    rounds: list[list[str]] = [list(removed)] if removed and all(isinstance(r, str) for r in removed) \
        else [list(r) for r in removed if r]
    current = {u.name: u.name for u in adapter.units(teacher)}  # current path -> teacher path
    for rnd in rounds:
        gone = set(rnd)
        unknown = gone - set(current)
        if unknown:
            raise UserError(f"removed unit(s) {sorted(unknown)} are not units of the teacher; is --teacher the "
                            "model this one was pruned from?")
        by_parent: dict[str, list[str]] = {}
        for path in current:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            by_parent.setdefault(parent, []).append(path)
        nxt: dict[str, str] = {}
        for parent, paths in by_parent.items():
            pmod = get_module(teacher, parent) if parent else teacher
            numeric = isinstance(pmod, (nn.Sequential, nn.ModuleList)) and all(p.rsplit(".", 1)[-1].isdigit() for p in paths)
            if numeric:
                # positions among ALL children of the parent in the current model, not only units
                keys = sorted((int(p.rsplit(".", 1)[-1]) for p in paths))
                shift = 0
                for k in keys:
                    p = f"{parent}.{k}" if parent else str(k)
                    if p in gone:
                        shift += 1
                        continue
                    newp = f"{parent}.{k - shift}" if parent else str(k - shift)
                    nxt[newp] = current[p]
            else:
                for p in paths:
                    if p not in gone:
                        nxt[p] = current[p]
        current = nxt
    return current


class _FeatureTap:
    """Forward hooks collecting unit outputs by module path."""

    def __init__(self, model: nn.Module, paths: Sequence[str], adapter: ModelAdapter):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for p in paths:
            self.handles.append(get_module(model, p).register_forward_hook(self._hook(p, adapter)))

    def _hook(self, name: str, adapter: ModelAdapter):
        def hook(_m, _i, o):
            self.out[name] = adapter.unit_output(o)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
