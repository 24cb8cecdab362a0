"""The public Python API (what ``sglp-edge prune`` itself calls)::

    import sglp_edge

    model = sglp_edge.load_model("my_net.py:build")          # or any nn.Module you built
    plan = sglp_edge.analyze(model, calib, units="body.*", keep=4)
    pruned = sglp_edge.apply(model, plan)                      # a smaller copy; model is untouched
    sglp_edge.save(pruned, "pruned/")                          # safetensors + how to rebuild, no pickles
    again = sglp_edge.load("pruned/")                          # nn.Module, in any process

``calib`` is a list of batches: ``(images, labels)`` tuples for classifiers (labels feed GradNorm's
loss), or ``input_ids`` tensors for decoder LMs. ``units`` names the layer units by module path
globs for architectures sglp-edge does not know (``'layer1.*,layer2.*'``); the known families
(CIFAR/torchvision ResNets, VGG-BN, MobileNetV2, EfficientNet, ViT, LLaMA-family LMs) need none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models import registry
from sglp_edge.models.base import ModelAdapter
from sglp_edge.models.hf_llm import save_hf
from sglp_edge.models.user_module import load_file_builder
from sglp_edge.sglp import prune
from sglp_edge.sglp.plan import PruneConfig, PrunePlan

__all__ = ["analyze", "apply", "save", "load", "load_model"]


def load_model(source: str, *, weights: str | Path | None = None, num_classes: int | None = None,
               units: str | None = None, trust_builder: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """A model by the names the CLI takes (``file.py:fn``, ``model.pt2``, ``torchvision:resnet18``,
    a checkpoint folder, ``default``...), as an ``nn.Module`` that remembers how to rebuild itself.
    ``trust_builder``: run a checkpoint's builder file whose sha256 no longer matches;
    ``trust_remote_code``: run a Hugging Face folder's own code (``auto_map``)."""
    return registry.load_model(source, weights=weights, num_classes=num_classes, units=units, need_adapter=False,
                 trust_builder=trust_builder, trust_remote_code=trust_remote_code).model


def _adapter(model: nn.Module, units: str | Sequence[str] | None) -> ModelAdapter:
    return registry.get_adapter(model, units)


def _batches(calib: Any) -> list[Any]:
    if isinstance(calib, torch.Tensor) or (isinstance(calib, tuple) and len(calib) == 2
                                           and all(isinstance(t, torch.Tensor) for t in calib)):
        return [calib]  # one batch
    if isinstance(calib, Iterable):
        out = list(calib)
        if out:
            return out
    raise UserError("calib must be a non-empty list of batches: (images, labels) tuples or input_ids tensors")


def analyze(model: nn.Module, calib: Any, *, units: str | Sequence[str] | None = None, keep: Optional[int] = None,
            target_macs: Optional[float] = None, method: str = "sglp", grad_batches: Any = None,
            adapter: Optional[ModelAdapter] = None, progress: Any = None, **options: Any) -> PrunePlan:
    """Which layer units to remove (nothing is modified). ``keep``: units to keep, or
    ``target_macs``: fraction of MACs to remove. ``grad_batches``: GradNorm's batches (default:
    the first calibration batch). ``options``: the other :class:`~sglp_edge.sglp.plan.PruneConfig`
    fields (``protocol``, ``k``, ``eval_budget``, ``allocation``, ``seed``...)."""
    cka_b = _batches(calib)
    grad_b = _batches(grad_batches) if grad_batches is not None else cka_b[:1]
    adapter = adapter or _adapter(model, units)
    search = options.pop("removal_search", None)  # keep: auto (sglp_edge.budget.search.BudgetSearch)
    try:
        cfg = PruneConfig(keep=keep, target_macs=target_macs, method=method, **options)
    except TypeError as e:
        raise UserError(f"unknown analyze() option ({e}); see sglp_edge.sglp.plan.PruneConfig") from None
    plan = prune.analyze(model, adapter, cka_b, grad_b, cfg, progress=progress, removal_search=search)
    plan._sglp_adapter = adapter  # type: ignore[attr-defined]  # apply() removes with the same units
    return plan


def apply(model: nn.Module, plan: PrunePlan, *, adapter: Optional[ModelAdapter] = None, calib: Any = None) -> nn.Module:
    """A pruned copy of ``model`` without the plan's units (``model`` itself is unchanged). The copy
    remembers how it was made, so :func:`save` can write it. A plan made with ``heal="linear"``
    needs ``calib`` (calibration batches, as for :func:`analyze`) to fit its maps."""
    adapter = adapter or getattr(plan, "_sglp_adapter", None) or _adapter(model, None)
    pruned = prune.apply_plan(model, adapter, plan, _batches(calib) if calib is not None else ())
    pruned.eval()
    prior = getattr(model, "_sglp_pruning", None)
    spec = prior["spec"] if prior else None
    if spec is None:
        try:
            spec = registry.model_spec(adapter, model)
        except UserError:
            spec = None  # save() then needs builder=
    pruned._sglp_pruning = {"adapter": adapter, "spec": spec,  # type: ignore[assignment]
                            "rounds": [*(prior["rounds"] if prior else []), list(plan.removed)], "method": plan.method}
    return pruned


def save(pruned: nn.Module, folder: str | Path, *, builder: Optional[str] = None, tokenizer: Any = None,
         extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``pruned`` (from :func:`apply`) to ``folder`` atomically: ``model.safetensors`` plus
    ``sglp_model.json`` (how to rebuild the original and which units to remove); decoder LMs as a
    Hugging Face folder. A model built in your own code needs ``builder="my_net.py:build"`` unless
    it came from :func:`load_model`."""
    info = getattr(pruned, "_sglp_pruning", None)
    if info is None:
        raise UserError("save() takes a model returned by sglp_edge.apply()")
    adapter: ModelAdapter = info["adapter"]
    if adapter.modality == "tokens":
        return save_hf(pruned, folder, tokenizer=tokenizer, extra={"removed": info["rounds"][-1], **(extra or {})})
    spec = info["spec"]
    if builder is not None:
        ref_model = load_file_builder(builder)
        spec = registry.model_spec(adapter if adapter.family != "generic" else _adapter(ref_model, adapter.patterns),  # type: ignore[attr-defined]
                          ref_model)
    if spec is None:
        raise UserError("sglp-edge cannot tell how to rebuild this model: pass builder='path/to/file.py:build_fn' "
                        "(a function returning the unpruned model), or load it with sglp_edge.load_model")
    return registry.save_checkpoint(pruned, adapter, folder, spec=spec, removed_units=info["rounds"],
                           extra={"method": info.get("method"), **(extra or {})})


def load(folder: str | Path, *, trust_builder: bool = False) -> nn.Module:
    """A model saved by :func:`save` (or ``sglp-edge prune``), rebuilt and with its weights. Its
    builder file runs only when its sha256 matches the saved one, or with ``trust_builder``."""
    loaded = registry.load_model(str(folder), trust_builder=trust_builder)
    m = loaded.model
    spec = (loaded.meta or {}).get("spec")
    if spec is not None:
        m._sglp_pruning = {"adapter": loaded.adapter, "spec": spec, "method": (loaded.meta or {}).get("method"),
                           "rounds": (loaded.meta or {}).get("removal_rounds") or []}
    return m
