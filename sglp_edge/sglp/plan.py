"""What an SGLP analysis is asked (:class:`PruneConfig`, with the choices its options take) and what
it returns (:class:`PrunePlan`, the plan of which units go). :func:`sglp_edge.sglp.prune.analyze`
makes the plan; :mod:`sglp_edge.sglp.selection` reads the config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sglp_edge.sglp.baselines import BASELINES

METHODS = ("sglp", *BASELINES)
ALLOCATIONS = ("auto", "proportional", "redundancy")
#: what the GradNorm evaluation budget may change: "raise" (default) raises k until every segment's
#: exhaustive/beam search fits the budget; "search" keeps the k the CKA structure supports (the k
#: rule) and spends the budget on a budgeted search inside its segments. "search" measured worse on
#: ResNet-56 with healing (77.83 % against 84.87 % right after pruning, seed 0; benchmarks/results/k-budget.md), so it is an option
K_BUDGETS = ("raise", "search")


@dataclass
class PruneConfig:
    keep: int | None = None  # total units to keep (non-removable ones included)
    target_macs: float | None = None  # fraction of MACs to remove, 0 < r < 1
    method: str = "sglp"
    k: int | None = None  # number of segments; None = automatic
    k_max: int | None = None
    k_rule: str = "elbow"
    sequence: str = "colsum"
    # candidate score inside a segment (sglp_edge.sglp.importance): "auto" is "loss" (calibration loss)
    # for decoder LMs and image models (SmolLM2 30->22: perplexity 80.5 against GradNorm's 119.8 right
    # after pruning; MobileNetV2 and ResNet-56 after KD: benchmarks/results/) and "natural" GradNorm for encoders
    protocol: str = "auto"
    exhaustive_budget: int = 64
    beam_width: int = 2
    eval_budget: int | None = 80  # GradNorm evaluations over all segments per selection (None = unbounded)
    k_budget: str = "raise"  # K_BUDGETS: raise k to fit the budget ("raise") or keep the rule's k ("search")
    direction: str = "auto"  # "auto": tear down under the natural protocol, the shorter way under reference
    seed: int = 0
    cka_mode: str = "tokens"
    # how the global number of removals is split over segments: "proportional" to their removable
    # units, or by "redundancy" (where the units with the highest CKA to their predecessor lie);
    # "auto": redundancy for decoder LMs, proportional otherwise (each measured: benchmarks/experiments/recovery.py)
    allocation: str = "auto"
    # training-free healing of each removed run: "none" or "linear" (a fitted map folded into the
    # kept unit before the run; sglp_edge.sglp.heal)
    heal: str = "none"
    heal_ridge: float = 1e-2
    # measured latency of each removable unit on the target (sglp_edge.budget): removals are then
    # split over segments in proportion to the latency their removable units cost
    unit_costs: dict[str, float] | None = None
    # what candidates are scored against: "labels" (the data's), "teacher" (image data whose labels are not
    # the model's classes: the unpruned model's soft outputs, sglp_edge.train.teacher_targets), "next-token" (LMs)
    # or "teacher-embeddings" (encoders); recorded in plan.json
    target: str = "labels"
    allow_degenerate: bool = False  # go on when every candidate scores the same (outputs independent of input)
    # forward-only scores ("loss") replay the units before each segment instead of recomputing them
    # (sglp_edge.sglp.prefix_cache): the same scores, for the cost of the segment and what follows it
    prefix_cache: bool = True


@dataclass
class PrunePlan:
    method: str
    family: str
    units: list[dict[str, Any]]
    removed: list[str]
    kept: list[str]
    n_units_before: int
    n_units_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    evaluations: int
    wall_s: float
    config: dict[str, Any]
    cka: list[list[float]] | None = None
    sequence: list[float] | None = None
    segments: list[list[int]] | None = None
    k: int | None = None
    k_chosen_by: str | None = None
    allocation: str | None = None  # how removals were split over segments (sglp)
    k_choice: dict[str, Any] | None = None  # why this k: the rule's curve, the budget's say (sglp)
    budget: dict[str, Any] | None = None  # how the evaluation budget was spent per segment (sglp)
    loss_table: list[float] | None = None
    selections: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] | None = None  # the latency-budget search (sglp_edge.budget), when keep is "auto"
    heal: dict[str, Any] | None = None  # the healing report, set by apply_plan
    prefix_cache: dict[str, Any] | None = None  # whether candidates replayed the units before their segment
    accelerator: dict[str, Any] | None = None  # where the analysis ran (device, dtype) and why
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["macs_reduction"] = self.macs_reduction
        d["params_reduction"] = self.params_reduction
        return d
