"""Knowledge-distillation building blocks of the recovery fine-tune (:mod:`sglp_edge.train.finetune`):
the KD loss on logits, the map from each kept unit of a pruned student to the teacher unit it came
from, the forward hooks that collect unit outputs for feature distillation, and the KD objectives
(images, language models) the fine-tune trains."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, get_module
from sglp_edge.train.objectives import Objective


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


# ---------------------------------------------------------------------------------------------
# the KD objectives the fine-tune trains (the sentence-encoder one is
# sglp_edge.tasks.feature_extraction.EncoderKDObjective)
# ---------------------------------------------------------------------------------------------
class KDObjective(Objective):
    """KD from ``teacher``: the feature hooks and the feature-KD term shared by the image, LM and
    encoder objectives; ``cfg`` is the run's :class:`sglp_edge.train.finetune.FinetuneConfig`."""

    def __init__(self, teacher: nn.Module, adapter: ModelAdapter, cfg: Any):
        self.teacher, self.adapter, self.cfg = teacher, adapter, cfg
        self.s_tap = self.t_tap = None
        if cfg.feature_weight > 0 and cfg.feature_map:
            self.fmap = dict(cfg.feature_map)

    def attach(self, student: nn.Module) -> None:
        if self.cfg.feature_weight > 0 and self.cfg.feature_map:
            self.s_tap = _FeatureTap(student, list(self.fmap), self.adapter)
            self.t_tap = _FeatureTap(self.teacher, list(self.fmap.values()), self.adapter)

    def detach(self) -> None:
        for tap in (self.s_tap, self.t_tap):
            if tap is not None:
                tap.close()
        self.s_tap = self.t_tap = None

    def with_feature_loss(self, loss: torch.Tensor, shown: dict[str, float]) -> torch.Tensor:
        """``loss`` plus the weighted feature-KD term when feature distillation is on (shown as 'feat')."""
        fl = self.feature_loss()
        if fl is None:
            return loss
        shown["feat"] = float(fl.detach())
        return loss + self.cfg.feature_weight * fl

    def feature_loss(self) -> torch.Tensor | None:
        if self.s_tap is None:
            return None
        losses = []
        for sp, tp in self.fmap.items():
            s, t = self.s_tap.out.get(sp), self.t_tap.out.get(tp)
            if s is None or t is None:
                continue
            if s.shape != t.shape:
                raise UserError(f"feature KD: student unit {sp} {tuple(s.shape)} and teacher unit {tp} "
                                f"{tuple(t.shape)} differ in shape; check the unit map")
            losses.append(F.mse_loss(s.float(), t.detach().float()))
        self.s_tap.out.clear()
        self.t_tap.out.clear()
        return torch.stack(losses).mean() if losses else None

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        self.teacher.eval()


class ImageKDObjective(KDObjective):
    """KD on logits; label-free (``cfg.target == "teacher"``): the labels are ignored, the loss is
    pure KD and the metric is ``agreement``, top-1 agreement with the teacher."""

    @property
    def label_free(self) -> bool:
        return self.cfg.target == "teacher"

    def train_loss(self, model, batch):
        x, y = batch
        with torch.no_grad():
            t = self.teacher(x)
        s = model(x)
        loss = kd_loss(s, t, None if self.label_free else y, self.cfg.temperature, self.cfg.alpha)
        shown = {"kd": float(loss.detach())}
        loss = self.with_feature_loss(loss, shown)
        ref = t.argmax(1) if self.label_free else y
        shown["agree" if self.label_free else "acc"] = float((s.argmax(1) == ref).float().mean())
        return loss, shown

    def eval_sums(self, model, batch):
        x, y = batch
        logits = model(x)
        if self.label_free:
            t = self.teacher(x)
            kl = F.kl_div(F.log_softmax(logits.float(), 1), F.log_softmax(t.float(), 1), log_target=True, reduction="sum")
            return {"n": float(len(y)), "agree": float((logits.argmax(1) == t.argmax(1)).sum()), "kl_sum": float(kl)}
        return {"n": float(len(y)), "correct": float((logits.argmax(1) == y).sum()),
                "loss_sum": float(F.cross_entropy(logits, y, reduction="sum"))}

    def finalize(self, sums):
        n = max(sums.get("n", 0.0), 1.0)
        if self.label_free:
            agree = sums.get("agree", 0.0) / n
            return {"agreement": agree, "kl": sums.get("kl_sum", 0.0) / n, "n": sums.get("n", 0.0), "score": agree}
        acc = sums.get("correct", 0.0) / n
        return {"acc": acc, "loss": sums.get("loss_sum", 0.0) / n, "n": sums.get("n", 0.0), "score": acc}


def _lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


class LMKDObjective(KDObjective):
    """KD on next-token distributions over packed blocks (no padding: every position counts)."""

    def train_loss(self, model, batch):
        ids = batch
        with torch.no_grad():
            t = _lm_logits(self.teacher, ids)[:, :-1]
        s = _lm_logits(model, ids)[:, :-1]
        loss = kd_loss(s, t, ids[:, 1:], self.cfg.temperature, self.cfg.alpha)
        shown = {"kd": float(loss.detach())}
        loss = self.with_feature_loss(loss, shown)
        return loss, shown

    def eval_sums(self, model, batch):
        ids = batch
        logits = _lm_logits(model, ids)[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        return {"tokens": float(ids[:, 1:].numel()), "nll_sum": float(nll)}

    def finalize(self, sums):
        n = max(sums.get("tokens", 0.0), 1.0)
        nll = sums.get("nll_sum", 0.0) / n
        return {"ppl": math.exp(min(nll, 700.0)), "nll": nll, "tokens": sums.get("tokens", 0.0), "score": -nll}
