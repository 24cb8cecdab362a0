"""Image classification: calibration in batches of images, cross-entropy + KD on logits, one image
tensor in and logits out, held-out labelled images on the board, top-1 and latency per image.

The stages after prune and fine-tune: :meth:`ImageClassification.stage_eval_data` (held-out images
with labels and PyTorch's logits, training images for INT8 calibration), :meth:`stage_export` (both
models to ONNX, parity on held-out images), the compile of the shared ONNX route
(:func:`sglp_edge.pipeline.boards.stage_compile`) and the report (:mod:`sglp_edge.report.assemble`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.board.calib import save_npz
from sglp_edge.pipeline import boards
from sglp_edge.report.assemble import build_report
from sglp_edge.tasks.base import Task
from sglp_edge.tasks.context import TaskContext


class ImageClassification(Task):
    name = "image-classification"
    optimum_name = "image-classification"
    modality = "image"
    defaults = {
        "prune": {"calib_batches": 4, "batch_size": 128, "seq_len": 128},
        "finetune": {"batch_size": 128, "lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-4},
        "eval": {"samples": 2000},
    }

    # ---- data and models -----------------------------------------------------------------------
    def load_data(self, ctx: TaskContext) -> Any:
        from sglp_edge.data.datasets import get_dataset  # heavy: torch
        from sglp_edge.pipeline.calibration import fixed_input_size, input_channels  # heavy: torch

        # fixed-resolution models (ViTs) get their data at their own input size; grey models, 1 channel
        return get_dataset(ctx.cfg.data, root=ctx.cfg.data_root, seed=ctx.cfg.seed,
                           resize=fixed_input_size(ctx.loaded.model), channels=input_channels(ctx.loaded.model))

    def save_model(self, ctx: TaskContext, loaded: Any, model: Any, folder: Path, extra: dict[str, Any]) -> None:
        from sglp_edge.models.registry import save_checkpoint  # heavy: torch

        save_checkpoint(model, loaded.adapter, folder, spec=loaded.meta["spec"],
                        removed_units=loaded.meta.get("removal_rounds", []), extra=extra)

    def models(self, ctx: TaskContext) -> tuple[tuple[str, Any], tuple[str, Any]]:
        """``("original", model), ("pruned", model)``: the model as loaded and the run's final model."""
        from sglp_edge.models.registry import load_checkpoint  # heavy: torch

        pruned = load_checkpoint(ctx.final_model_dir(), trust_builder=ctx.cfg.trust_builder).model
        return ("original", ctx.loaded.model), ("pruned", pruned)

    # ---- stages ----------------------------------------------------------------------------------
    def stage_eval_data(self, ctx: TaskContext) -> dict[str, Any]:
        """Held-out images with labels and each model's PyTorch logits, as .npz for the board, and
        training images for INT8 calibration."""
        final_hash = ctx.final_hash()

        def fn(tmp: Path) -> dict[str, Any]:
            import torch  # heavy

            d = ctx.data
            test = d.split("test")
            idx = list(range(min(ctx.cfg.eval.samples, len(test))))
            x = torch.stack([test[i][0] for i in idx])
            y = torch.tensor([int(test[i][1]) for i in idx])
            out = {}
            for which, model in self.models(ctx):
                model.eval()
                with torch.no_grad():
                    logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
                top1 = float((logits.argmax(1) == y).double().mean() * 100)
                out[which] = {"top1": top1, "logits": logits.numpy()}
            _write_eval_npz(tmp, x, y, out)
            cal = d.calibration_batches(max(1, ctx.cfg.eval.calib_samples // 100), 100, seed=ctx.cfg.seed + 1)
            _write_calib_npz(tmp / "calib.npz", cal)
            return {"samples": len(idx), "torch_top1": {k: v["top1"] for k, v in out.items()}, "split": "test"}

        return ctx.runner.stage("eval_data", ctx.inputs("eval", eval=ctx.cfg.eval.model_dump(), final=final_hash), fn)

    def stage_export(self, ctx: TaskContext) -> dict[str, Any]:
        """Both models to ONNX, their parity checked on the first 256 held-out images."""
        from sglp_edge.export.onnx_export import export_onnx  # heavy: torch

        final_hash = ctx.final_hash()
        e = ctx.cfg.export

        def fn(tmp: Path) -> dict[str, Any]:
            import torch  # heavy

            with np.load(ctx.run_dir / "eval_data" / "eval_original.npz") as z:
                px = torch.from_numpy(z["x"][:256])
                py = z["y"][:256]
            res = {}
            for which, model in self.models(ctx):
                r = export_onnx(model, px[:1], tmp / f"{which}.onnx", kind="image", opset=e.opset, simplify=e.simplify,
                                parity_inputs=px, parity_labels=py, parity_source="held-out test images",
                                progress=False)
                res[which] = {"opset": r.opset, "exporter": r.exporter, "parity": r.parity, "sha256": r.sha256,
                              "size_bytes": r.size_bytes, "simplify": r.simplify}
            return res

        return ctx.runner.stage("export", ctx.inputs("export", export=e.model_dump(), final=final_hash), fn)

    def stage_compile(self, ctx: TaskContext, board: Any) -> dict[str, Any]:
        return boards.stage_compile(ctx, board)

    def build_report(self, ctx: TaskContext, prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
        return build_report(ctx, prune, ft, ev, ex, targets)


def _write_eval_npz(tmp: Path, x: Any, y: Any, out: dict[str, Any]) -> None:
    """``eval_original.npz`` and ``eval_pruned.npz``: the images, labels, each model's logits and the
    unpruned model's top-1 (the board computes the accuracy drop against it)."""
    for which in ("original", "pruned"):
        save_npz(tmp / f"eval_{which}.npz", x.numpy().astype(np.float32), y.numpy().astype(np.int64),
                 logits=out[which]["logits"].astype(np.float32))
        with np.load(tmp / f"eval_{which}.npz") as z:
            arrays = dict(z)
        arrays["baseline_top1"] = np.float64(out["original"]["top1"])
        np.savez(tmp / f"eval_{which}.npz", **arrays)


def _write_calib_npz(dest: Path, batches: list) -> None:
    """Training images (and their labels) for INT8 calibration."""
    import torch  # heavy

    cx = torch.cat([b[0] for b in batches]).numpy().astype(np.float32)
    cy = torch.cat([b[1] for b in batches]).numpy().astype(np.int64)
    save_npz(dest, cx, cy)
