"""Image classification: calibration in batches of images, cross-entropy + KD on logits, one image
tensor in and logits out, held-out labelled images on the board, top-1 and latency per image.

The stages themselves live in :mod:`sglp_edge.pipeline.run` (where they grew); this task routes to them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglp_edge.tasks.base import Task


class ImageClassification(Task):
    name = "image-classification"
    optimum_name = "image-classification"
    modality = "image"
    defaults = {
        "prune": {"calib_batches": 4, "batch_size": 128, "seq_len": 128},
        "finetune": {"batch_size": 128, "lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-4},
        "eval": {"samples": 2000},
    }

    def load_data(self, pipe: Any) -> Any:
        from sglp_edge.data.datasets import get_dataset
        from sglp_edge.pipeline.prune_job import fixed_input_size, input_channels

        # fixed-resolution models (ViTs) get their data at their own input size; grey models, 1 channel
        return get_dataset(pipe.cfg.data, root=pipe.cfg.data_root, seed=pipe.cfg.seed,
                           resize=fixed_input_size(pipe.loaded.model), channels=input_channels(pipe.loaded.model))

    def save_model(self, pipe: Any, loaded: Any, model: Any, folder: Path, extra: dict[str, Any]) -> None:
        from sglp_edge.models.registry import save_checkpoint

        save_checkpoint(model, loaded.adapter, folder, spec=loaded.meta["spec"],
                        removed_units=loaded.meta.get("removal_rounds", []), extra=extra)

    def stage_eval_data(self, pipe: Any) -> dict[str, Any]:
        return pipe.stage_eval_data()

    def stage_export(self, pipe: Any) -> dict[str, Any]:
        return pipe.stage_export()

    def stage_compile(self, pipe: Any, board: Any) -> dict[str, Any]:
        return pipe.stage_compile(board)

    def build_report(self, pipe: Any, prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
        return pipe.build_report(prune, ft, ev, ex, targets)
