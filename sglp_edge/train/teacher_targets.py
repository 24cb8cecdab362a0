"""Label-free calibration and recovery: when a data set's labels are not the model's classes (an image
folder with another number of class folders, no ``--class-map``), the model's own outputs are the
target. SGLP's candidate score and the KD fine-tune then compare a pruned candidate with the
unpruned model instead of with folder numbers that mean nothing to it.

The target is the unpruned model's soft output (softmax at temperature 1), put where the label
was: ``cross_entropy(student, softmax(teacher))`` is ``KL(teacher || student)`` at T = 1 plus the
teacher's entropy, a constant per batch, so the loss score ranks candidates exactly as the KL
does and GradNorm sees the KL's gradient. Soft targets rather than the teacher's arg-max: the
arg-max throws away how sure the model was (a candidate that flips a near-tie costs as much as
one that breaks a confident answer) and gives a non-zero loss to the unpruned model itself.

Also here: the check that a model's outputs depend on its input at all (an architecture built
without its weights: a zero classifier head gives the same logits for every image, every
candidate then scores the same and a parity check of such a model proves nothing).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from benchmarks.board.errors import UserError

DEGENERATE = ("the model's outputs do not depend on its input: are its weights loaded? "
              "(--allow-degenerate goes on anyway)")


def choose_target(n_outputs: int, data_classes: Optional[int], *, class_mapped: bool = False,
                  named_classes: bool = False) -> tuple[str, str]:
    """``("labels", why)`` when the data's labels are the model's classes, else ``("teacher", why)``.
    A class map (``--class-map``) forces labels; otherwise the counts must match. A named data set
    (``named_classes``: Fashion-MNIST, CIFAR...) with MORE classes than the model has outputs stays
    on labels, so that the label check names the likely mistake (``--num-classes``)."""
    if class_mapped:
        return "labels", "--class-map maps the data's folders to the model's classes"
    if not data_classes:
        return "teacher", "the data has no labels"
    if data_classes == n_outputs or (named_classes and data_classes > n_outputs):
        return "labels", f"the data's {data_classes} classes match the model's {n_outputs} outputs"
    return "teacher", f"the data has {data_classes} classes but the model has {n_outputs} outputs"


def notice(why: str) -> str:
    """The one line a label-free run prints."""
    return (f"label-free: {why}, so candidates are scored (and KD fine-tunes) against the original model's "
            "own outputs (KL at T=1), not the data's labels; give --class-map FILE.json (folder name -> class "
            "index) to use the labels")


@torch.no_grad()
def model_logits(adapter: Any, model: torch.nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The model's outputs on each batch, eval mode."""
    was = model.training
    model.eval()
    try:
        return [adapter.forward(model, b).detach().float() for b in batches]
    finally:
        model.train(was)


def is_constant(outputs: torch.Tensor, rel: float = 1e-5) -> bool:
    """Whether every row of ``outputs`` (batch first, more than one row) is the same within rounding."""
    if outputs.dim() < 1 or outputs.shape[0] < 2:
        return False
    o = outputs.reshape(outputs.shape[0], -1).double()
    spread = float((o - o[:1]).abs().max())
    return spread <= rel * (1.0 + float(o.abs().max()))


def check_not_degenerate(outputs: torch.Tensor, *, allow: bool = False, log: Any = None) -> bool:
    """Stop with :data:`DEGENERATE` when ``outputs`` are constant over the batch (warn instead with
    ``allow``). Returns whether they were constant."""
    if not is_constant(outputs):
        return False
    if not allow:
        raise UserError(DEGENERATE)
    if log is not None:
        log("warning: " + DEGENERATE.split(" (")[0] + " (going on: --allow-degenerate)")
    return True


def with_soft_targets(batches: Sequence[Any], logits: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, softmax(logits))`` for each image batch: the label replaced by the model's own output."""
    return [(b[0], torch.softmax(t, dim=-1)) for b, t in zip(batches, logits)]


def scores_all_equal(scores: Sequence[float], rel: float = 1e-9) -> bool:
    """Whether more than one candidate was scored and every score is the same within rounding."""
    vals = [float(v) for v in scores]
    if len(vals) < 2:
        return False
    return max(vals) - min(vals) <= rel * max(1.0, abs(max(vals)))


def calibration_targets(loaded: Any, cka_b: list, grad_b: list, *, target: str, why: str,
                        allow_degenerate: bool = False, log: Any = None) -> tuple[list, list]:
    """Image models: stop on constant outputs (first calibration batch), and with ``target``
    "teacher" put the model's own soft outputs in place of the labels of every calibration batch
    (the GradNorm batches too: drawn separately, or the first of the CKA batches)."""
    adapter, model = loaded.adapter, loaded.model
    if getattr(adapter, "modality", "image") != "image":
        return cka_b, grad_b
    first = model_logits(adapter, model, cka_b[:1])[0]
    if first.dim() != 2:
        return cka_b, grad_b
    check_not_degenerate(first, allow=allow_degenerate, log=log)
    if target != "teacher":
        return cka_b, grad_b
    if log is not None:
        log(notice(why))
    cka_t = with_soft_targets(cka_b, [first] + model_logits(adapter, model, cka_b[1:]))
    if len(grad_b) <= len(cka_b) and all(g is c for g, c in zip(grad_b, cka_b)):
        return cka_t, cka_t[: len(grad_b)]
    return cka_t, with_soft_targets(grad_b, model_logits(adapter, model, grad_b))
