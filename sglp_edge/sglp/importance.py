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
* ``"loss"`` - not GradNorm: the calibration loss (``adapter.loss``, forward only) of the
  pre-trained network with the segment's other units removed; the LOWEST loss wins. SLEB's
  criterion, applied inside SGLP's segments and under the same search.
* ``"healed"`` - the calibration loss of the candidate AFTER training-free linear healing of its
  removed runs (:func:`sglp_edge.sglp.heal.heal_linear`, fitted on the same batches); the LOWEST
  wins. It scores what ``--heal linear`` will actually leave, so a removal the linear map repairs
  well is preferred to one that merely looks cheap un-healed (about one heal fit per evaluation).
  Each segment is scored with the other segments whole, like the other protocols. (Scoring it
  with the earlier segments' choices in place and healed was tried: on ResNet-56 seed 0 it gave
  88.12 % against 88.52 % right after pruning, at about twice the time; not kept.)

Search: every combination while ``C(n, r)`` is within ``exhaustive_budget`` evaluations, else a
beam search that removes one unit at a time keeping the ``beam_width`` best partial candidates,
else (when a global evaluation budget does not allow the beam) a shortlist greedy search that fits
the budget. Scores are cached by candidate, and every evaluation is counted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter
from sglp_edge.sglp.baselines import calibration_loss
from sglp_edge.sglp.heal import heal_linear
from sglp_edge.sglp.prefix_cache import PrefixReplay, replayed_loss

PROTOCOLS = ("natural", "reference", "loss", "healed")


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
                 protocol: str = "natural", seed: int = 0, replay: PrefixReplay | None = None):
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
        # forward-only scores replay the units before the segment (sglp_edge.sglp.prefix_cache)
        self.replay = replay if protocol == "loss" else None

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
        net = self._reference_model(kept) if self.protocol == "reference" else self.model
        if self.protocol == "healed" and removed:
            net, _ = heal_linear(self.model, self.adapter, removed, self.batches)
        replay = self.replay if self.replay is not None and self.replay.ready() else None  # (captured on the whole net)
        with self.adapter.without_units(net, removed) as m:
            if replay is not None:
                value = replayed_loss(replay, self.adapter, m, replay.first_of(segment_units))
            elif self.protocol in ("loss", "healed"):
                value = calibration_loss(self.adapter, m, self.batches)
            else:
                value = gradnorm(m, self.adapter, self.batches)
        self.evaluations += 1
        self._cache[key] = value
        if self.on_evaluation is not None:
            self.on_evaluation()
        return value


def _key(units: Sequence[str]) -> str:
    return "+".join(units)


DIRECTIONS = ("auto", "down", "up")


def _beam_steps(n: int, n_keep: int, direction: str = "auto") -> tuple[str, int]:
    """Search direction: tear down from the full segment (remove one unit a step) or build up from
    nothing (add one a step); ``"auto"`` takes whichever needs fewer steps."""
    if direction not in DIRECTIONS:
        raise UserError(f"unknown search direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    if direction == "auto":
        direction = "down" if n - n_keep <= n_keep else "up"
    return (direction, n - n_keep) if direction == "down" else (direction, n_keep)


def beam_cost(n: int, n_keep: int, beam_width: int, direction: str = "auto") -> int:
    """Upper bound on the evaluations of a beam search of width ``beam_width``."""
    if n_keep in (0, n):
        return 0
    direction, steps = _beam_steps(n, n_keep, direction)
    total, width = 0, 1
    for step in range(steps):
        size = n - step if direction == "down" else step
        children = size if direction == "down" else n - size
        total += min(width * children, math.comb(n, size - 1 if direction == "down" else size + 1))
        width = min(beam_width, math.comb(n, size - 1 if direction == "down" else size + 1))
    return total


def search_cost(n: int, n_keep: int, exhaustive_budget: int, beam_width: int, direction: str = "auto",
                max_evaluations: int | None = None) -> int:
    """Upper bound on the evaluations :func:`select_in_segment` spends on one segment."""
    if n_keep in (0, n):
        return 0
    c = math.comb(n, n_keep)
    cap = exhaustive_budget if max_evaluations is None else min(exhaustive_budget, max_evaluations)
    if c <= cap:
        return c
    b = beam_cost(n, n_keep, beam_width, direction)
    if max_evaluations is None or b <= max_evaluations:
        return b
    return max(min_search_cost(n, n_keep), min(b, max_evaluations))


def min_search_cost(n: int, n_keep: int) -> int:
    """The cheapest search: every unit's removal (or addition) scored once, ``n`` evaluations
    (fewer when exhaustive search is cheaper still)."""
    if n_keep in (0, n):
        return 0
    return min(math.comb(n, n_keep), n)


def select_in_segment(scorer: CandidateScorer, segment: int, units: Sequence[str], n_keep: int, *,
                      exhaustive_budget: int = 64, beam_width: int = 2, max_evaluations: int | None = None,
                      direction: str = "auto") -> SegmentSelection:
    """Choose ``n_keep`` of the segment's removable ``units`` by GradNorm.

    * every combination while there are at most ``exhaustive_budget`` of them (and no more than
      ``max_evaluations``);
    * else a beam search of width ``beam_width`` that removes (``direction="down"``) or adds
      (``"up"``) one unit per step, scoring each partial candidate as a network, when its cost
      fits in ``max_evaluations``;
    * else a *shortlist greedy* search that fits the budget: the first step scores every unit's
      move (``n`` evaluations); each later step re-scores only the ``m`` moves that ranked best
      so far (``m`` as large as the budget allows) and takes the best. With ``m <= 1`` it is a
      one-shot ranking: the ``n`` single-move scores decide every step (``n`` evaluations)."""
    units = list(units)
    n = len(units)
    if not 0 <= n_keep <= n:
        raise UserError(f"segment {segment}: cannot keep {n_keep} of {n} removable units")
    if n_keep == n or n_keep == 0:
        keep = units if n_keep == n else []
        return SegmentSelection(segment, units, keep, [u for u in units if u not in keep], "trivial", 0)
    if max_evaluations is not None and max_evaluations < min_search_cost(n, n_keep):
        raise UserError(f"segment {segment}: an evaluation budget of {max_evaluations} is below the "
                        f"{min_search_cost(n, n_keep)} that scoring each of its {n} units once needs; "
                        "raise --eval-budget")
    sign = 1.0 if scorer.higher_is_better else -1.0
    seen: dict[str, float] = {}
    before = scorer.evaluations
    order = {u: i for i, u in enumerate(units)}

    def evaluate(kept: tuple[str, ...]) -> float:
        seen[_key(kept)] = v = scorer.score(units, kept)
        return v

    def sort_kept(c: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(c, key=order.__getitem__))

    c_all = math.comb(n, n_keep)
    cap = exhaustive_budget if max_evaluations is None else min(exhaustive_budget, max_evaluations)
    direction, steps = _beam_steps(n, n_keep, direction)
    if c_all <= cap:
        best = max(itertools.combinations(units, n_keep), key=lambda c: sign * evaluate(c))
        method = "exhaustive"
    elif max_evaluations is None or beam_cost(n, n_keep, beam_width, direction) <= max_evaluations:
        beam: list[tuple[str, ...]] = [tuple(units)] if direction == "down" else [()]
        for _ in range(steps):
            if direction == "down":
                children = {tuple(u for u in b if u != drop) for b in beam for drop in b}
            else:
                children = {sort_kept(b + (add,)) for b in beam for add in units if add not in b}
            ranked = sorted(sorted(children), key=lambda c: sign * evaluate(c), reverse=True)
            beam = ranked[:beam_width]
        best = beam[0]
        method = f"beam-{direction}"
    else:
        m = (max_evaluations - n) // (steps - 1) if steps > 1 else 0
        current = tuple(units) if direction == "down" else ()

        def child(move: str) -> tuple[str, ...]:
            return tuple(u for u in current if u != move) if direction == "down" else sort_kept(current + (move,))

        last = {u: sign * evaluate(child(u)) for u in units}  # move -> latest score (higher = better)
        for step in range(steps):
            movable = [u for u in units if (u in current) == (direction == "down")]
            ranked = sorted(movable, key=lambda u: (-last[u], order[u]))
            if step > 0 and m > 1:
                for u in ranked[:m]:
                    last[u] = sign * evaluate(child(u))
                ranked = sorted(ranked[:m], key=lambda u: (-last[u], order[u]))
            current = child(ranked[0])
        best = current
        method = f"greedy-{direction}(m={m})" if m > 1 else f"oneshot-{direction}"
    keep = list(best)
    return SegmentSelection(segment, units, keep, [u for u in units if u not in keep], method,
                            scorer.evaluations - before, seen)


def resolve_protocol(protocol: str, modality: str) -> str:
    """The protocol "auto" stands for: the calibration-loss score ("loss") for decoder LMs and image
    models, where it measured best after KD (README: SmolLM2, MobileNetV2 and ResNet-56), GradNorm
    under the "natural" protocol for sentence encoders (not measured there); any other value is itself."""
    if protocol == "auto":
        return "loss" if modality in ("tokens", "image") else "natural"
    return protocol


def resolve_allocation(allocation: str, modality: str) -> str:
    """The allocation "auto" stands for: redundancy for token models (decoder LMs), proportional
    otherwise; any other value is itself."""
    if allocation == "auto":
        return "redundancy" if modality == "tokens" else "proportional"
    return allocation
