"""GradNorm layer selection inside SGLP segments (step 4 of the method).

A *candidate* of a segment is the set of its removable units that are kept; the segment's other
removable units are removed and every other segment stays whole. Its score is the L2 norm of the
gradient of the task loss (cross-entropy / next-token loss) w.r.t. all parameters, accumulated
over the SAME fixed calibration batches for every candidate, with the network in eval mode
(BatchNorm running statistics, no dropout) and no training step.

Two candidate protocols (``protocol=``):

* ``"reference"`` - as in the reference code: a randomly initialised copy of the network holds the
  pre-trained weights only in the candidate's kept units of the segment. The random copy is
  re-created from ONE saved random state for every candidate (the reference forgets this, so its
  later candidates already hold pre-trained weights everywhere: defect 1). Higher GradNorm wins
  (the zero-cost-proxy reading: a larger gradient at initialisation means a more trainable net).
* ``"natural"`` - the pre-trained network itself with the segment's other units removed. Here a
  removal that keeps the network close to its trained optimum leaves a small gradient, so the
  LOWEST GradNorm wins.

Search: every combination while ``C(n, r)`` is within ``exhaustive_budget`` evaluations, else a
beam search that removes one unit at a time keeping the ``beam_width`` best partial candidates.
Scores are cached by candidate, and every evaluation is counted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..models.base import ModelAdapter

PROTOCOLS = ("natural", "reference")


def gradnorm(model: nn.Module, adapter: ModelAdapter, batches: Sequence[Any]) -> float:
    """L2 norm of d(mean loss over ``batches``)/d(parameters); eval mode, no update."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            for b in batches:
                loss = adapter.loss(model, b) / len(batches)
                loss.backward()
        sq = torch.zeros((), dtype=torch.float64)
        for p in params:
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        value = float(sq.sqrt())
    finally:
        for p in params:
            p.grad = None
        model.train(was_training)
    if not math.isfinite(value):
        raise UserError("GradNorm is not finite on the calibration batches; check the model and data")
    return value


def random_state_like(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised copy's state dict, made once (seeded) and reused for every candidate."""
    import copy

    rand = copy.deepcopy(model)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        init_fn = getattr(rand, "init_weights", None)
        if callable(init_fn) and hasattr(rand, "config"):  # Hugging Face PreTrainedModel
            rand.apply(rand._init_weights)
        else:
            for m in rand.modules():
                if m is not rand and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    return {k: v.detach().clone() for k, v in rand.state_dict().items()}


@dataclass
class SegmentSelection:
    segment: int
    units: list[str]  # removable units of the segment, in order
    keep: list[str]
    remove: list[str]
    method: str  # "exhaustive" | "beam" | "trivial"
    evaluations: int
    scores: dict[str, float] = field(default_factory=dict)  # candidate ("a+b+c") -> GradNorm


class CandidateScorer:
    """Scores candidates of one segment under a protocol, with a cache and an evaluation count."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batches: Sequence[Any], *,
                 protocol: str = "natural", seed: int = 0):
        if protocol not in PROTOCOLS:
            raise UserError(f"unknown GradNorm protocol {protocol!r}; choose one of {PROTOCOLS}")
        self.model, self.adapter, self.batches = model, adapter, list(batches)
        self.protocol, self.seed = protocol, seed
        self.evaluations = 0
        self._rand_state: dict[str, torch.Tensor] | None = None
        self._pretrained: dict[str, torch.Tensor] | None = None
        self._work: nn.Module | None = None
        self._cache: dict[str, float] = {}
        self.on_evaluation: Callable[[], None] | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.protocol == "reference"

    def _reference_model(self, kept: Sequence[str]) -> nn.Module:
        import copy

        if self._rand_state is None:
            self._rand_state = random_state_like(self.model, self.seed)
            self._pretrained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._work = copy.deepcopy(self.model)
        assert self._work is not None and self._pretrained is not None
        state = dict(self._rand_state)
        for name in kept:
            prefix = name + "."
            for k, v in self._pretrained.items():
                if k.startswith(prefix):
                    state[k] = v
        self._work.load_state_dict(state, strict=True)
        return self._work

    def score(self, segment_units: Sequence[str], kept: Sequence[str]) -> float:
        """GradNorm of one candidate (cached: asking again costs no evaluation)."""
        key = _key(segment_units) + "|" + _key(kept)
        if key in self._cache:
            return self._cache[key]
        removed = [u for u in segment_units if u not in set(kept)]
        net = self.model if self.protocol == "natural" else self._reference_model(kept)
        with self.adapter.without_units(net, removed) as m:
            value = gradnorm(m, self.adapter, self.batches)
        self.evaluations += 1
        self._cache[key] = value
        if self.on_evaluation is not None:
            self.on_evaluation()
        return value


def _key(units: Sequence[str]) -> str:
    return "+".join(units)


def _beam_steps(n: int, n_keep: int) -> tuple[str, int]:
    """Beam direction: tear down from the full segment (remove one unit a step) or build up from
    nothing (add one a step), whichever takes fewer steps."""
    return ("down", n - n_keep) if n - n_keep <= n_keep else ("up", n_keep)


def search_cost(n: int, n_keep: int, exhaustive_budget: int, beam_width: int) -> int:
    """Upper bound on the evaluations :func:`select_in_segment` spends on one segment."""
    if n_keep in (0, n):
        return 0
    if math.comb(n, n_keep) <= exhaustive_budget:
        return math.comb(n, n_keep)
    direction, steps = _beam_steps(n, n_keep)
    total, width = 0, 1
    for step in range(steps):
        size = n - step if direction == "down" else step
        children = size if direction == "down" else n - size
        total += min(width * children, math.comb(n, size - 1 if direction == "down" else size + 1))
        width = min(beam_width, math.comb(n, size - 1 if direction == "down" else size + 1))
    return total


def select_in_segment(scorer: CandidateScorer, segment: int, units: Sequence[str], n_keep: int, *,
                      exhaustive_budget: int = 64, beam_width: int = 2) -> SegmentSelection:
    """Choose ``n_keep`` of the segment's removable ``units`` by GradNorm: every combination
    while there are at most ``exhaustive_budget`` of them, else a beam search of width
    ``beam_width`` that removes (or, when fewer units are kept than removed, adds) one unit per
    step, scoring each partial candidate as a network."""
    units = list(units)
    n = len(units)
    if not 0 <= n_keep <= n:
        raise UserError(f"segment {segment}: cannot keep {n_keep} of {n} removable units")
    if n_keep == n or n_keep == 0:
        keep = units if n_keep == n else []
        return SegmentSelection(segment, units, keep, [u for u in units if u not in keep], "trivial", 0)
    sign = 1.0 if scorer.higher_is_better else -1.0
    seen: dict[str, float] = {}
    before = scorer.evaluations
    order = {u: i for i, u in enumerate(units)}

    def evaluate(kept: tuple[str, ...]) -> float:
        seen[_key(kept)] = v = scorer.score(units, kept)
        return v

    if math.comb(n, n_keep) <= exhaustive_budget:
        best = max(itertools.combinations(units, n_keep), key=lambda c: sign * evaluate(c))
        method = "exhaustive"
    else:
        direction, steps = _beam_steps(n, n_keep)
        beam: list[tuple[str, ...]] = [tuple(units)] if direction == "down" else [()]
        for _ in range(steps):
            if direction == "down":
                children = {tuple(u for u in b if u != drop) for b in beam for drop in b}
            else:
                children = {tuple(sorted(b + (add,), key=order.__getitem__)) for b in beam for add in units if add not in b}
            ranked = sorted(sorted(children), key=lambda c: sign * evaluate(c), reverse=True)
            beam = ranked[:beam_width]
        best = beam[0]
        method = f"beam-{direction}"
    keep = list(best)
    return SegmentSelection(segment, units, keep, [u for u in units if u not in keep], method,
                            scorer.evaluations - before, seen)


def allocate_removals(segment_removables: Sequence[int], segment_sizes: Sequence[int], n_remove: int) -> list[int]:
    """Split a global number of removals over segments in proportion to their removable units
    (largest remainder), never emptying a segment (each keeps >= 1 unit, removable or not)."""
    caps = [min(r, s - 1) for r, s in zip(segment_removables, segment_sizes)]
    if n_remove > sum(caps):
        raise UserError(f"cannot remove {n_remove} units while keeping one unit per segment "
                        f"(at most {sum(caps)}); ask for fewer segments (--k) or keep more units")
    total = sum(segment_removables) or 1
    exact = [n_remove * r / total for r in segment_removables]
    alloc = [min(int(math.floor(e)), c) for e, c in zip(exact, caps)]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    while sum(alloc) < n_remove:
        progressed = False
        for i in order:
            if sum(alloc) >= n_remove:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
                progressed = True
        if not progressed:  # pragma: no cover - guarded by the cap check above
            break
    return alloc

