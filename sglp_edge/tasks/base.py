"""The Task interface the pipeline calls (one subclass per file in this package)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sglp_edge.pipeline.config import BoardSection, RunConfig
    from sglp_edge.pipeline.run import Pipeline


class Task:
    name: str = ""
    optimum_name: str = ""  # Optimum's name for the export layout
    modality: str = ""  # what the adapter must take: "image" | "tokens"
    #: config defaults, section -> field -> value; applied where the YAML leaves a field out
    defaults: dict[str, dict[str, Any]] = {}

    def check_config(self, cfg: "RunConfig") -> None:
        """Cheap checks before any heavy work; raise UserError with one line naming the fix."""

    def load_data(self, pipe: "Pipeline") -> Any:
        raise NotImplementedError

    def save_model(self, pipe: "Pipeline", loaded: Any, model: Any, folder: Path, extra: dict[str, Any]) -> None:
        raise NotImplementedError

    # the stages after prune and fine-tune, in the order they run
    def stage_eval_data(self, pipe: "Pipeline") -> dict[str, Any]:
        raise NotImplementedError

    def stage_export(self, pipe: "Pipeline") -> dict[str, Any]:
        raise NotImplementedError

    def stage_compile(self, pipe: "Pipeline", board: "BoardSection") -> dict[str, Any]:
        raise NotImplementedError

    def stage_bench(self, pipe: "Pipeline", board: "BoardSection", compile_stage: str) -> dict[str, Any]:
        return pipe.stage_bench(board, compile_stage)

    def derived_metrics(self, results: dict[str, Any]) -> dict[str, Any]:
        """Metrics of the pruned artifact measured against the original (both benched the same way)."""
        return {}

    def build_report(self, pipe: "Pipeline", prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
        raise NotImplementedError
