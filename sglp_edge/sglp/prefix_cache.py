"""Segment-prefix replay for forward-only candidate scoring (the ``loss`` protocol).

Every candidate of a segment removes units of that segment only; the other segments stay whole.
So on a fixed calibration batch, every unit BEFORE the segment computes exactly what it computes
in the unpruned network, for every candidate. :class:`PrefixReplay` runs the unpruned network once
per batch, keeps each unit's raw output, and while a segment is scored makes the units before it
return their kept output instead of computing it: a candidate then costs the segment and what
follows it (plus the cheap modules outside the units, such as a token embedding), not the whole
network. The numbers are the same ones: each replayed tensor is the one the unit produced on the
same input, so the scores, and the units chosen, do not change.

It serves forward-only scores. GradNorm (``natural``, ``reference``) needs gradients through the
prefix and ``healed`` re-fits weights before the removed run, so those protocols score whole
networks as before.

Memory: one output per unit and batch (an LM: units x tokens x hidden x 4 bytes; a 16-layer model
with hidden 2048 on 512 tokens keeps 64 MB)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sglp_edge.models.base import ModelAdapter, Unit, get_module, hooked_forward


class PrefixReplay:
    """The unpruned network's unit outputs on each batch, replayed for the units before a segment."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, units: Sequence[Unit], batches: Sequence[Any]):
        self.model, self.adapter, self.batches = model, adapter, list(batches)
        self.names = [u.name for u in units]
        # the module objects, looked up now: while a candidate is scored its units are out of the tree
        self.modules = [get_module(model, n) for n in self.names]
        self.current = 0  # the batch being scored (set by the caller before each forward)
        self._outputs: list[list[Any]] | None = None  # [batch][unit] raw output
        self.usable = True
        self.why_not = ""

    def _capture(self) -> None:
        """One forward per batch of the whole network, keeping every unit's raw output; a unit
        called more (or less) than once per forward turns replay off (its output is not one value)."""
        mods = self.modules
        outs: list[list[Any]] = []
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for b in self.batches:
                    got: dict[int, list[Any]] = {}
                    hooked_forward(self.adapter, self.model, mods, b,
                                   lambda i, _a, _k, out: got.setdefault(i, []).append(_detach(out)))
                    if any(len(got.get(i, [])) != 1 for i in range(len(mods))):
                        self.usable, self.why_not = False, "a unit runs other than once per forward"
                        self._outputs = []
                        return
                    outs.append([got[i][0] for i in range(len(mods))])
        finally:
            self.model.train(was)
        self._outputs = outs

    def first_of(self, segment_units: Sequence[str]) -> int:
        """Index of the first of ``segment_units``: the units before it are the replayed prefix."""
        return min(self.names.index(n) for n in segment_units)

    def ready(self) -> bool:
        if self._outputs is None:
            self._capture()
        return self.usable

    @contextlib.contextmanager
    def replaying(self, first: int) -> Iterator[None]:
        """Within: units ``0 .. first - 1`` return their kept output for batch ``self.current``."""
        if first <= 0 or not self.ready():
            yield
            return
        patched = []
        try:
            for i in range(first):
                mod = self.modules[i]
                had = "forward" in mod.__dict__
                patched.append((mod, had, mod.__dict__.get("forward")))
                mod.forward = self._replay(i)
            yield
        finally:
            for mod, had, old in patched:
                if had:
                    mod.forward = old
                else:
                    del mod.forward

    def _replay(self, i: int) -> Any:
        def forward(*_args: Any, **_kw: Any) -> Any:
            assert self._outputs is not None
            return self._outputs[self.current][i]
        return forward


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    if isinstance(out, list):
        return [_detach(o) for o in out]
    return out


def replayed_loss(replay: PrefixReplay, adapter: ModelAdapter, model: nn.Module, first: int) -> float:
    """Mean task loss over the replay's batches with the units before ``first`` replayed; the same
    sum, in the same order, as :func:`sglp_edge.sglp.baselines.calibration_loss`."""
    was = model.training
    model.eval()
    total = 0
    try:
        with torch.no_grad(), replay.replaying(first):
            for i, b in enumerate(replay.batches):
                replay.current = i
                total = total + float(adapter.loss(model, b))
        return float(total / len(replay.batches))
    finally:
        model.train(was)
