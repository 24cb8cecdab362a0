"""Adapter for architectures sglp-edge does not know: the user declares the layer units by module
path globs (``--units 'layer1.*,layer2.*'``). A declared unit is removable when one forward pass
shows that its output has exactly its input's shape (so dropping it leaves a valid network); it
is then dropped from its parent Sequential/ModuleList or replaced by ``nn.Identity``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sglp_edge.models.base import AdapterError, ModelAdapter, Unit, get_module, glob_units, hooked_forward


class GenericAdapter(ModelAdapter):
    family = "generic"

    def __init__(self, model: nn.Module, patterns: str | Sequence[str]):
        self.patterns = patterns
        self.names = glob_units(model, patterns)
        if not self.names:
            raise AdapterError(f"--units {patterns!r} matches no module; module paths look like "
                               f"{[n for n, _ in model.named_modules() if n][:6]}")
        self._shape_ok: dict[str, bool] | None = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False  # only used when the user declares units

    def check_shapes(self, model: nn.Module, batch: Any) -> None:
        """One forward pass recording each unit's input and output shapes."""
        seen: dict[str, bool] = {}

        def on_call(i: int, args: tuple, _kwargs: dict, out: Any) -> None:
            x = args[0] if args else None
            y = self.unit_output(out)
            seen[self.names[i]] = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape

        hooked_forward(self, model, [get_module(model, n) for n in self.names], batch, on_call)
        self._shape_ok = {n: seen.get(n, False) for n in self.names}
        self._never_called = [n for n in self.names if n not in seen]
        if not any(self._shape_ok.values()):
            why = (f"{self._never_called[:4]} never run in the forward pass" if len(self._never_called) == len(self.names)
                   else "none keeps its input's shape (a removable unit must map a tensor to one of the same shape)")
            raise AdapterError(f"--units {self.patterns!r}: no declared unit can be removed: {why}; declare the "
                               "blocks inside a stage, e.g. 'layer1.*'")

    def units(self, model: nn.Module) -> list[Unit]:
        names = self.names if self._shape_ok is None else list(self._shape_ok)
        out = []
        for i, n in enumerate(names):
            ok = True if self._shape_ok is None else self._shape_ok[n]
            why = "" if ok else ("it never runs in the forward pass" if n in getattr(self, "_never_called", ())
                                 else "its output shape differs from its input shape")
            out.append(Unit(n, i, ok, why))
        return out
