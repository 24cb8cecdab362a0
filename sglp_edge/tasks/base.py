"""The Task interface the pipeline calls (one subclass per file in this package).

Every method gets the run's :class:`sglp_edge.tasks.context.TaskContext` (never the pipeline): the
config, the run folder, the stage runner, the log and the lazily loaded model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglp_edge.tasks.context import TaskContext


class Task:
    name: str = ""
    optimum_name: str = ""  # Optimum's name for the export layout
    modality: str = ""  # what the adapter must take: "image" | "tokens"
    #: config defaults, section -> field -> value; applied where the YAML leaves a field out
    defaults: dict[str, dict[str, Any]] = {}

    def check_config(self, cfg: Any) -> None:
        """Cheap checks of the run config (a RunConfig) before any heavy work; raise UserError with one
        line naming the fix."""

    def load_data(self, ctx: TaskContext) -> Any:
        raise NotImplementedError

    def save_model(self, ctx: TaskContext, loaded: Any, model: Any, folder: Path, extra: dict[str, Any]) -> None:
        raise NotImplementedError

    # the stages after prune and fine-tune, in the order they run (the benchmark is the pipeline's own,
    # sglp_edge.pipeline.boards.stage_bench, the same for every task)
    def stage_eval_data(self, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError

    def stage_export(self, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError

    def stage_compile(self, ctx: TaskContext, board: Any) -> dict[str, Any]:
        """The artifacts of one device (``board``: a BoardSection): ``{"original": ..., "pruned": ...,
        "stage": name}``."""
        raise NotImplementedError

    def derived_metrics(self, results: dict[str, Any]) -> dict[str, Any]:
        """Metrics of the pruned artifact measured against the original (both benched the same way)."""
        return {}

    def build_report(self, ctx: TaskContext, prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
        raise NotImplementedError
