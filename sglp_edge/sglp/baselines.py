"""Layer-selection baselines, to compare SGLP against at an equal layer budget.

Every baseline has the signature ``fn(adapter, model, units, batches, n_remove, seed) ->
BaselineResult`` and returns the names of exactly ``n_remove`` *removable* units to remove
(never a unit with ``removable=False``), per-unit scores, and notes:

* ``random``: a seeded uniform draw per removable unit; the ``n_remove`` smallest draws go.
  Scores: the draws.
* ``drop_last``: the last ``n_remove`` removable units in forward order (Lu et al. 2024 found
  this strong after light fine-tuning). Scores: unit position.
* ``block_influence`` (ShortGPT, Men et al. 2024): BI = 1 - cos(input, output) of each unit,
  averaged over examples (CNN features flattened per example) or tokens (LM hidden states);
  the ``n_remove`` removable units with the lowest BI go. Scores: BI of every unit.
* ``sleb`` (Song et al. 2024, SLEB): iterative removal by calibration loss. At each of the
  ``n_remove`` steps every remaining removable unit is removed in turn (temporarily, with
  ``adapter.without_units``) and the task loss (``adapter.loss``: cross-entropy / next-token) of
  the network left is measured on the calibration batches; the unit whose removal gives the lowest
  loss goes, and the next step re-measures on the smaller network. Scores: the first step's losses.
* ``angular`` (Gromov et al. 2024): for every window of n = ``n_remove`` consecutive units that
  are all removable, the angular distance arccos(cos(input of unit l, output of unit l+n-1)) / pi
  averaged over examples / tokens; the window with the smallest distance goes. Scores: the
  distance of the window starting at each unit. If no such window exists (e.g. the stride-2
  blocks split a CIFAR ResNet into short runs), it falls back to greedy one-at-a-time removal:
  n = 1 distances are measured, the closest unit is removed (temporarily, with
  ``adapter.without_units``), distances are re-measured on the smaller network, and so on; the
  result notes say so, and scores are then the n = 1 distances on the full network.

Forward passes run under ``torch.no_grad`` in eval mode (BatchNorm statistics are not touched;
the model's train/eval mode is restored afterwards), on the given calibration batches. When a
batch is a mapping with an ``attention_mask`` (B, T), padded tokens are left out of LM averages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import TOKEN_MODALITIES, AdapterError, ModelAdapter, Unit, get_module, hooked_forward


@dataclass
class BaselineResult:
    method: str
    removed: list[str]  # original unit names, in forward order
    scores: dict[str, float] = field(default_factory=dict)
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- capturing unit inputs and outputs ------------------------------------------------------

def _first_tensor_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


def stream_modules_io(adapter: ModelAdapter, model: nn.Module, modules: Sequence[tuple[str, nn.Module]],
                      batch: Any, on_io: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
    """One forward pass (no_grad, eval mode) calling ``on_io(i, input, output)`` from inside the
    forward hook of module i (first call of each), so statistics can be reduced on the fly
    without holding every unit's tensors."""
    seen: set[int] = set()

    def on_call(i: int, args: tuple, kwargs: dict, out: Any) -> None:
        if i in seen:
            return
        seen.add(i)
        x = _first_tensor_input(args, kwargs)
        if x is None:
            raise AdapterError(f"unit {modules[i][0]} received no tensor input; its input cannot be captured")
        on_io(i, x.detach(), adapter.unit_output(out).detach())

    hooked_forward(adapter, model, [m for _, m in modules], batch, on_call, eval_mode=True)
    missing = [modules[i][0] for i in range(len(modules)) if i not in seen]
    if missing:
        raise AdapterError(f"units {missing} were not called in a forward pass; check the unit list")


def capture_unit_io(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit],
                    batch: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass (no_grad, eval mode); each unit's (input, output), detached, in unit
    order. The input is the first positional argument or the ``hidden_states`` keyword (HF
    decoder layers); the output is ``adapter.unit_output`` of the module's return value."""
    mods = [(u.name, get_module(model, u.name)) for u in units]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    stream_modules_io(adapter, model, mods, batch, lambda i, x, y: got.__setitem__(i, (x, y)))
    return [got[i] for i in range(len(mods))]


# ---- per-example cosine ---------------------------------------------------------------------

def _token_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"]
    return None


def _rows(t: torch.Tensor, per_token: bool, mask: torch.Tensor | None) -> torch.Tensor:
    t = t.detach().to("cpu", torch.float64)
    if t.dim() == 3 and per_token:
        if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
            return t[mask.to("cpu").bool()]
        return t.reshape(-1, t.shape[-1])
    if t.dim() <= 1:
        return t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine; 1 where both rows are zero (identical), 0 where only one is."""
    if a.shape != b.shape:
        raise AdapterError(f"cannot compare a unit input of shape {tuple(a.shape)} with an output of shape "
                           f"{tuple(b.shape)}; only shape-preserving (removable) units can be scored")
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    cos = torch.where((na == 0) ^ (nb == 0), torch.zeros_like(cos), cos)
    return cos.clamp(-1.0, 1.0)


class _Mean:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def add(self, v: torch.Tensor) -> None:
        self.sum += float(v.sum())
        self.count += int(v.numel())

    @property
    def value(self) -> float:
        return self.sum / self.count if self.count else float("nan")


# ---- checks ----------------------------------------------------------------------------------

def _removable(units: Sequence[Unit]) -> list[Unit]:
    return [u for u in units if u.removable]


def _check(units: Sequence[Unit], n_remove: int, batches: Sequence[Any] | None, needs_data: bool) -> None:
    if not units:
        raise UserError("no layer units to choose from")
    if isinstance(n_remove, bool) or not isinstance(n_remove, (int, np.integer)) or n_remove < 0:
        raise UserError(f"the number of units to remove must be a non-negative integer, got {n_remove!r}")
    rem = _removable(units)
    if n_remove > len(rem):
        raise UserError(f"cannot remove {n_remove} units: only {len(rem)} of {len(units)} units are removable "
                        f"(stem and shape-changing units stay); ask for at most {len(rem)}")
    if needs_data and n_remove > 0 and not batches:
        raise UserError("this baseline needs calibration batches; give at least one (--calib-batches)")


def _in_order(units: Sequence[Unit], names: set[str]) -> list[str]:
    return [u.name for u in units if u.name in names]


# ---- the baselines ---------------------------------------------------------------------------

def random_baseline(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batches: Sequence[Any],
                    n_remove: int, seed: int = 0) -> BaselineResult:
    _check(units, n_remove, batches, needs_data=False)
    rem = _removable(units)
    draws = np.random.default_rng(seed).random(len(rem))
    order = np.argsort(draws, kind="stable")[:n_remove]
    removed = _in_order(units, {rem[i].name for i in order})
    return BaselineResult("random", removed, {u.name: float(d) for u, d in zip(rem, draws)},
                          f"seeded uniform draw (seed {seed})")


def drop_last(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batches: Sequence[Any],
              n_remove: int, seed: int = 0) -> BaselineResult:
    _check(units, n_remove, batches, needs_data=False)
    rem = _removable(units)
    removed = [u.name for u in rem[len(rem) - n_remove:]] if n_remove else []
    return BaselineResult("drop_last", removed, {u.name: float(i) for i, u in enumerate(units)},
                          "the last removable units in forward order")


def block_influence_scores(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit],
                           batches: Sequence[Any]) -> dict[str, float]:
    """ShortGPT Block Influence 1 - E[cos(input, output)] of every unit (shape-preserving ones;
    units whose output shape differs from their input get no score)."""
    per_token = adapter.modality in TOKEN_MODALITIES
    means = [_Mean() for _ in units]
    mods = [(u.name, get_module(model, u.name)) for u in units]
    for batch in batches:
        mask = _token_mask(batch)

        def on_io(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
            if x.shape == y.shape:
                means[i].add(_cos_rows(_rows(x, per_token, mask), _rows(y, per_token, mask)))

        stream_modules_io(adapter, model, mods, batch, on_io)
    return {u.name: 1.0 - m.value for u, m in zip(units, means) if m.count}


def block_influence(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batches: Sequence[Any],
                    n_remove: int, seed: int = 0) -> BaselineResult:
    _check(units, n_remove, batches, needs_data=True)
    scores = block_influence_scores(adapter, model, units, batches) if batches else {}
    rem = [u for u in _removable(units) if u.name in scores]
    if len(rem) < n_remove:
        raise UserError(f"only {len(rem)} removable units could be scored; ask for at most {len(rem)}")
    order = sorted(range(len(rem)), key=lambda i: (scores[rem[i].name], i))[:n_remove]
    return BaselineResult("block_influence", _in_order(units, {rem[i].name for i in order}), scores,
                          "ShortGPT block influence 1 - cos(input, output); lowest removed")


def calibration_loss(adapter: ModelAdapter, model: nn.Module, batches: Sequence[Any]) -> float:
    """Mean task loss (``adapter.loss``) over ``batches``; eval mode, no gradients."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(sum(float(adapter.loss(model, b)) for b in batches) / len(batches))
    finally:
        model.train(was)


def sleb(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batches: Sequence[Any],
         n_remove: int, seed: int = 0, on_evaluation: Callable[[], None] | None = None) -> BaselineResult:
    _check(units, n_remove, batches, needs_data=True)
    batches = adapter.with_targets(model, batches)  # encoders: the unpruned model's embeddings to distil
    removed: list[str] = []
    first: dict[str, float] = {}
    steps = []
    for _ in range(n_remove):
        cands = [u.name for u in units if u.removable and u.name not in removed]
        losses = {}
        for n in cands:
            with adapter.without_units(model, removed + [n]):
                losses[n] = calibration_loss(adapter, model, batches)
            if on_evaluation is not None:
                on_evaluation()
        if not first:
            first = dict(losses)
        pick = min(cands, key=lambda n: losses[n])  # first in forward order on a tie
        removed.append(pick)
        steps.append(f"{pick} ({losses[pick]:.4f})")
    return BaselineResult("sleb", _in_order(units, set(removed)), first,
                          "SLEB: iterative removal by calibration loss, re-measured after each removal: "
                          + ", ".join(steps))


def _angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.arccos(_cos_rows(a, b)) / math.pi


def _windows(units: Sequence[Unit], n: int) -> list[int]:
    return [s for s in range(len(units) - n + 1) if all(u.removable for u in units[s:s + n])]


def _window_distances(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batches: Sequence[Any],
                      n: int, modules: Sequence[tuple[str, nn.Module]] | None = None,
                      starts: Sequence[int] | None = None) -> dict[int, float]:
    """Mean angular distance between the input of unit s and the output of unit s+n-1."""
    per_token = adapter.modality in TOKEN_MODALITIES
    starts = _windows(units, n) if starts is None else list(starts)
    mods = modules or [(u.name, get_module(model, u.name)) for u in units]
    means = {s: _Mean() for s in starts}
    by_end: dict[int, list[int]] = {}
    for s in starts:
        by_end.setdefault(s + n - 1, []).append(s)
    start_set = set(starts)
    for batch in batches:
        mask = _token_mask(batch)
        pending: dict[int, torch.Tensor] = {}  # inputs of windows still waiting for their last unit

        def on_io(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
            if i in start_set:
                pending[i] = x.clone()  # later in-place ops must not change it
            for s in by_end.get(i, ()):
                if s not in pending:
                    raise AdapterError(f"unit {units[i].name} ran before unit {units[s].name}; units must be "
                                       "listed in forward order")
                x0 = pending.pop(s)
                if x0.shape != y.shape:
                    raise AdapterError(f"unit {units[s].name}'s input and unit {units[i].name}'s output differ "
                                       f"in shape ({tuple(x0.shape)} vs {tuple(y.shape)})")
                means[s].add(_angular(_rows(x0, per_token, mask), _rows(y, per_token, mask)))

        stream_modules_io(adapter, model, mods, batch, on_io)
    return {s: m.value for s, m in means.items()}


def angular(adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit], batches: Sequence[Any],
            n_remove: int, seed: int = 0) -> BaselineResult:
    _check(units, n_remove, batches, needs_data=True)
    if n_remove == 0:
        return BaselineResult("angular", [], {}, "nothing to remove")
    units = list(units)
    starts = _windows(units, n_remove)
    if starts:
        d = _window_distances(adapter, model, units, batches, n_remove, starts=starts)
        best = min(starts, key=lambda s: (d[s], s))
        removed = [u.name for u in units[best:best + n_remove]]
        return BaselineResult("angular", removed, {units[s].name: d[s] for s in starts},
                              f"angular distance over windows of {n_remove} consecutive removable units; "
                              f"closest window starts at {units[best].name} (distance {d[best]:.4f})")
    # no window of n_remove consecutive removable units: greedy one at a time, re-measured
    mods = [(u.name, get_module(model, u.name)) for u in units]  # module objects survive removal
    removed: list[str] = []
    first: dict[str, float] = {}
    steps = []
    for _ in range(n_remove):
        idx = [i for i, u in enumerate(units) if u.removable and u.name not in removed]
        keep = [i for i in range(len(units)) if units[i].name not in removed]
        sub_units = [units[i] for i in keep]
        sub_mods = [mods[i] for i in keep]
        pos = {i: p for p, i in enumerate(keep)}
        with adapter.without_units(model, removed):
            d = _window_distances(adapter, model, sub_units, batches, 1, modules=sub_mods,
                                  starts=[pos[i] for i in idx])
        dist = {units[i].name: d[pos[i]] for i in idx}
        if not first:
            first = dict(dist)
        pick = min(idx, key=lambda i: (dist[units[i].name], i))
        removed.append(units[pick].name)
        steps.append(f"{units[pick].name} ({dist[units[pick].name]:.4f})")
    return BaselineResult("angular", _in_order(units, set(removed)), first,
                          f"no window of {n_remove} consecutive removable units exists; fell back to greedy "
                          f"one-at-a-time removal (n=1 angular distance, re-measured after each removal): "
                          + ", ".join(steps))


BaselineFn = Callable[[ModelAdapter, nn.Module, Sequence[Unit], Sequence[Any], int, int], BaselineResult]

BASELINES: dict[str, BaselineFn] = {
    "random": random_baseline,
    "drop_last": drop_last,
    "block_influence": block_influence,
    "angular": angular,
    "sleb": sleb,
}


def select_baseline(name: str, adapter: ModelAdapter, model: nn.Module, units: Sequence[Unit] | None,
                    batches: Sequence[Any], n_remove: int, seed: int = 0) -> BaselineResult:
    """Run the named baseline; ``units`` defaults to ``adapter.units(model)``."""
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if units is None:
        units = adapter.units(model)
    return BASELINES[name](adapter, model, list(units), list(batches or []), n_remove, seed)
