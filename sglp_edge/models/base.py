"""The model-adapter interface: which layer units a model has, which can go, and how to remove them.

A *unit* is a prunable layer unit (residual block, conv layer, transformer block) named by its
module path in ``model.named_modules()``. Unit outputs are what SGLP compares (CKA); removable
units are what it may drop. A unit is removable only when removing it leaves a valid network:
its output has the same shape as its input (no stride or channel change) and it is not the stem.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.user_module import build_from_reference


#: modalities whose unit outputs are (batch, tokens, hidden) hidden states, compared token by token:
#: "tokens" (decoder LMs: input_ids) and "sentences" (encoders: input_ids + attention_mask)
TOKEN_MODALITIES = ("tokens", "sentences")


class AdapterError(UserError, ValueError):
    """A model/adapter problem the user can fix; the message says how."""


@dataclass(frozen=True)
class Unit:
    name: str  # module path in the ORIGINAL model, e.g. "layer1.3" or "model.layers.7"
    index: int  # position in the unit sequence (0-based)
    removable: bool
    reason: str = ""  # why it is not removable (empty when removable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        if not part:
            continue
        mod = mod[int(part)] if part.isdigit() and isinstance(mod, (nn.Sequential, nn.ModuleList)) else getattr(mod, part)
    return mod


def drop_modules(model: nn.Module, paths: Iterable[str]) -> nn.Module:
    """Remove modules in place: dropped from a parent Sequential/ModuleList (re-indexing it), or
    replaced by ``nn.Identity`` elsewhere. Paths refer to the model *before* this call."""
    by_parent: dict[str, list[str]] = {}
    for p in paths:
        parent_path = p.rsplit(".", 1)[0] if "." in p else ""
        by_parent.setdefault(parent_path, []).append(p.rsplit(".", 1)[-1])
    for parent_path, keys in by_parent.items():
        parent = get_module(model, parent_path) if parent_path else model
        if isinstance(parent, nn.Sequential):
            kept = [(n, m) for n, m in parent._modules.items() if n not in set(keys)]
            numeric = all(n.isdigit() for n, _ in parent._modules.items())
            parent._modules.clear()
            for i, (n, m) in enumerate(kept):
                parent._modules[str(i) if numeric else n] = m
        elif isinstance(parent, nn.ModuleList):
            kept = [m for n, m in parent._modules.items() if n not in set(keys)]
            parent._modules.clear()
            for i, m in enumerate(kept):
                parent._modules[str(i)] = m
        else:
            for k in keys:
                setattr(parent, k, nn.Identity())
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy. A ``torch.export`` program (unflattened) holds fake tensors that cannot be
    copied: it is rebuilt from its .pt2 file, its removed units mirrored, and its weights loaded."""
    ref = getattr(model, "_sglp_builder", None)
    if not (ref and ref.get("kind") == "pt2"):
        return copy.deepcopy(model)
    fresh = build_from_reference(ref, check=False)
    gone = [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)]
    drop_modules(fresh, [n for n in gone if not isinstance(get_module(fresh, n), nn.Identity)])
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.train(model.training)
    return fresh


class ModelAdapter(ABC):
    """Knows one model family. Stateless: every method takes the model."""

    family: str = "base"
    #: what the model consumes: "image" (tensor NCHW, labels), "tokens" (input_ids) or "sentences"
    #: (input_ids + attention_mask, an encoder producing sentence embeddings)
    modality: str = "image"

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter recognises the model."""

    @abstractmethod
    def units(self, model: nn.Module) -> list[Unit]:
        """The model's layer units in forward order."""

    def unit_output(self, output: Any) -> torch.Tensor:
        """Tensor to compare from a unit module's forward output (override for tuple outputs)."""
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output

    def remove(self, model: nn.Module, names: Sequence[str], *, inplace: bool = False) -> nn.Module:
        """Return a genuinely smaller network without the named units (original unit names)."""
        units = {u.name: u for u in self.units(model)}
        bad = [n for n in names if n not in units]
        if bad:
            raise AdapterError(f"unknown unit(s) {bad}; known units: {list(units)[:8]}...")
        fixed = [n for n in names if not units[n].removable]
        if fixed:
            raise AdapterError(f"unit(s) {fixed} cannot be removed: {units[fixed[0]].reason}")
        out = model if inplace else copy_model(model)
        drop_modules(out, self.removal_paths(out, names))
        self.after_removal(out, names)
        return out

    def removal_paths(self, model: nn.Module, names: Sequence[str]) -> list[str]:
        """Module paths that removing the named units drops (default: the units themselves)."""
        return list(names)

    @contextlib.contextmanager
    def without_units(self, model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
        """Temporarily remove units in place (no copy of the weights), restoring the original
        structure on exit. Used to score many candidates of a large model cheaply; config-level
        bookkeeping (``after_removal``) is not applied, so use it for forward/backward only."""
        paths = self.removal_paths(model, names)
        parents = {p.rsplit(".", 1)[0] if "." in p else "" for p in paths}
        saved = {}
        for pp in parents:
            parent = get_module(model, pp) if pp else model
            saved[pp] = (parent, collections.OrderedDict(parent._modules))
        try:
            drop_modules(model, paths)
            yield model
        finally:
            for parent, mods in saved.values():
                parent._modules.clear()
                parent._modules.update(mods)

    def after_removal(self, model: nn.Module, removed: Sequence[str]) -> None:
        """Hook for families that keep layer counts/indices in config (HF LMs)."""

    # ---- task loss, used by GradNorm and fine-tuning -------------------------------------
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return model(x)

    def with_targets(self, model: nn.Module, batches: Sequence[Any]) -> list[Any]:
        """The calibration batches ready for :meth:`loss` on ``model`` and its pruned candidates.
        Tasks whose loss compares with the unpruned model (encoders: its sentence embeddings)
        attach those targets here, once; a labelled or next-token loss needs nothing."""
        return list(batches)

    # ---- architecture spec, to rebuild a pruned model without pickling code -----------------
    def spec(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able description from which :func:`build` rebuilds the *unpruned* architecture."""
        raise AdapterError(f"{self.family}: saving an architecture spec is not supported")

    def build(self, spec: dict[str, Any]) -> nn.Module:
        raise AdapterError(f"{self.family}: rebuilding from a spec is not supported")


@dataclass
class LoadedModel:
    """A model as :func:`sglp_edge.models.registry.load_model` returns it, with its adapter and origin."""
    model: nn.Module
    adapter: ModelAdapter
    source: str
    kind: str  # "vision-checkpoint" | "builtin" | "torchvision" | "hf" | "gguf"
    meta: dict[str, Any] = field(default_factory=dict)  # sglp_model.json / manifest contents
    removed_units: list[str] = field(default_factory=list)
    tokenizer: Any = None


def hooked_forward(adapter: ModelAdapter, model: nn.Module, modules: Sequence[nn.Module], batch: Any,
                   on_call: Callable[[int, tuple, dict, Any], None], *, eval_mode: bool = False) -> None:
    """One forward pass ``adapter.forward(model, batch)`` under no_grad with a forward hook on each of
    ``modules``: ``on_call(i, args, kwargs, output)`` runs on every call of module i. With
    ``eval_mode`` the pass runs in eval mode and the model's training flag is restored after. The
    hooks are removed even when the pass raises."""

    def make_hook(i: int) -> Callable:
        def hook(_m, args, kwargs, out):
            on_call(i, args, kwargs, out)

        return hook

    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            adapter.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        if eval_mode:
            model.train(was_training)


def capture_unit_outputs(
    adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batch: Any
) -> list[torch.Tensor]:
    """One forward pass; returns each unit's output tensor (detached), in unit order."""
    outs: dict[int, torch.Tensor] = {}
    hooked_forward(adapter, model, [get_module(model, u.name) for u in units], batch,
                   lambda i, _args, _kw, out: outs.__setitem__(i, adapter.unit_output(out).detach()))
    missing = [u.name for i, u in enumerate(units) if i not in outs]
    if missing:
        raise AdapterError(f"units {missing} produced no output in a forward pass")
    return [outs[i] for i in range(len(units))]


def glob_units(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Module paths matching comma-separated glob patterns, outermost matches only, in
    registration (forward) order. E.g. ``'layer1.*,layer2.*'`` selects the direct children of
    layer1 and layer2 (a pattern's ``*`` does not cross a dot)."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if not name:
            continue
        if any(fnmatch.fnmatchcase(name, p) and name.count(".") == p.count(".") for p in patterns):
            if not any(name.startswith(c + ".") for c in chosen):
                chosen.append(name)
    return chosen
