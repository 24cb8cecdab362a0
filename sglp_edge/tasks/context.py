"""What a task's stages see of a run: :class:`TaskContext` (the pipeline builds one per run).

A task never holds the pipeline itself: it gets the run's config, its folder, the stage runner (the
resumable stages of :mod:`sglp_edge.pipeline.stages`), the log, the lazily loaded original model and
data, and the stage inputs every stage hashes (:meth:`TaskContext.inputs`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

_CODE_HASH: str | None = None


def code_hash() -> str:
    """Content hash of this tool's own code: a stage re-runs when the code that made it changed."""
    global _CODE_HASH
    if _CODE_HASH is None:
        root = Path(__file__).resolve().parents[2]
        h = hashlib.sha256()
        for pkg in ("sglp_edge", "exporters", "benchmarks"):
            for f in sorted((root / pkg).rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()[:16]
    return _CODE_HASH


class TaskContext:
    """One run as its task sees it.

    ``cfg`` is the run's :class:`sglp_edge.pipeline.config.RunConfig` (with the task's defaults
    filled), ``runner`` its :class:`sglp_edge.pipeline.stages.StageRunner`, ``task`` the
    :class:`sglp_edge.tasks.base.Task` that loads the data."""

    def __init__(self, cfg: Any, run_dir: Path, runner: Any, task: Any, log: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.runner, self.task, self.log = cfg, Path(run_dir), runner, task, log
        self._loaded: Any = None
        self._data: Any = None

    @property
    def loaded(self) -> Any:
        """The original model as loaded (:func:`sglp_edge.models.registry.load_model`), once."""
        if self._loaded is None:
            from sglp_edge.models.registry import load_model  # heavy: torch

            self._loaded = load_model(self.cfg.model, units=self.cfg.units, trust_builder=self.cfg.trust_builder,
                                      trust_remote_code=self.cfg.trust_remote_code)
        return self._loaded

    @property
    def data(self) -> Any:
        """The task's data set (:meth:`sglp_edge.tasks.base.Task.load_data`), once."""
        if self._data is None:
            self._data = self.task.load_data(self)
        return self._data

    def inputs(self, stage: str, **more: Any) -> dict[str, Any]:
        """What every stage's input hash covers (model, data, seed, this code), plus the stage's own."""
        cfg = self.cfg
        base = {"model": cfg.model, "data": cfg.data, "seed": cfg.seed, "code": code_hash()}
        if cfg.task != "image-classification":  # (keeps the image runs' stage hashes as they were)
            base.update(task=cfg.task, text=cfg.text.model_dump())
        if cfg.units:
            base["units"] = cfg.units
        return {**base, **more}

    def final_stage(self) -> str:
        """The stage whose model is the run's pruned model: the fine-tune, or the prune without one."""
        return "finetune" if self.cfg.finetune.enabled else "prune"

    def final_model_dir(self) -> Path:
        return self.run_dir / self.final_stage() / "model"

    def final_hash(self) -> str:
        """The recorded hash of the final model's weights (an input of every stage after it)."""
        return self.runner.file_hash(self.final_stage(), "model/model.safetensors")
