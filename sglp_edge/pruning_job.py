"""One prune job (what ``sglp-edge prune`` and the pipeline run): load the model, draw fixed
calibration batches from the TRAINING split, analyse, remove the chosen units and write the output
folder atomically: the pruned model, ``plan.json`` and ``cka_heatmap.png``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from exporters.atomic import atomic_dir
from .errors import UserError


@dataclass
class PruneJob:
    model: str
    out: Path
    data: str = "fashion-mnist"
    data_root: Optional[Path] = None
    keep: Optional[int] = None
    target_macs: Optional[float] = None
    method: str = "sglp"
    k: Optional[int] = None
    protocol: str = "natural"
    calib_batches: int = 4
    grad_batches: int = 1
    batch_size: int = 0
    seq_len: int = 128
    exhaustive_budget: int = 64
    beam_width: int = 2
    eval_budget: Optional[int] = 80
    allocation: str = "auto"
    heal: str = "none"
    units: Optional[str] = None
    weights: Optional[Path] = None
    num_classes: Optional[int] = None
    seed: int = 0
    threads: int = 0


@dataclass
class PruneResult:
    plan: Any  # PrunePlan
    pruned: torch.nn.Module
    loaded: Any  # LoadedModel of the original
    out: Path


def calibration_batches(loaded: Any, data: str, *, n_batches: int, batch_size: int, seq_len: int, seed: int,
                        data_root: Optional[Path] = None, offset: int = 0) -> list[Any]:
    """Fixed calibration batches drawn from the training split of ``data`` (never the test split).
    Images: list of (x, y); token models: list of input_ids tensors of shape (batch, seq_len)."""
    from . import data as D

    if loaded.adapter.modality == "sentences":  # encoders: tokenised calibration sentences with a mask
        from .tasks.feature_extraction import get_sentence_dataset

        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: a tokenizer is needed to draw sentence calibration data")
        if data.strip().lower() not in ("text", "english", "python-docs"):
            raise UserError(f"encoders calibrate on English sentences: use --data text (got {data!r})")
        bs = batch_size or 32
        sents = get_sentence_dataset(loaded.tokenizer, data_root, seed=seed, max_length=seq_len,
                                     max_sentences={"train": 1, "val": 1, "test": 1})
        return sents.calibration_batches(n_batches, bs, seed=seed + offset)
    if loaded.adapter.modality == "tokens":
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: a tokenizer is needed to draw text calibration data")
        need = n_batches * (batch_size or 8) * seq_len
        text = D.get_text_dataset(loaded.tokenizer, data_root, seed=seed, block_size=seq_len,
                                  max_tokens=max(4 * need, 200_000))
        return text.calibration_batches(n_batches, batch_size or 8, seed=seed + offset)
    bundle = D.get_dataset(data, root=data_root, seed=seed)
    return bundle.calibration_batches(n_batches, batch_size or 128, seed=seed + offset)


def run_prune_job(job: PruneJob, *, show_progress: bool = False, loaded: Any = None) -> PruneResult:
    from .models.registry import load_model, save_checkpoint
    from .sglp.plots import cka_heatmap_png
    from .sglp.prune import PruneConfig, analyze, apply_plan

    if job.keep is None and job.target_macs is None:
        raise UserError("say how much to prune: --keep N (units to keep) or --target-macs R (fraction of MACs to remove)")
    if job.threads:
        torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(job.model, weights=job.weights, num_classes=job.num_classes, units=job.units)
    model, adapter = loaded.model, loaded.adapter
    cka_b = calibration_batches(loaded, job.data, n_batches=job.calib_batches, batch_size=job.batch_size,
                                seq_len=job.seq_len, seed=job.seed, data_root=job.data_root)
    grad_b = cka_b[: job.grad_batches] if job.grad_batches <= len(cka_b) else calibration_batches(
        loaded, job.data, n_batches=job.grad_batches, batch_size=job.batch_size, seq_len=job.seq_len,
        seed=job.seed, data_root=job.data_root, offset=1)
    cfg = PruneConfig(keep=job.keep, target_macs=job.target_macs, method=job.method, k=job.k, protocol=job.protocol,
                      exhaustive_budget=job.exhaustive_budget, beam_width=job.beam_width,
                      eval_budget=job.eval_budget or None, allocation=job.allocation, heal=job.heal,
                      seed=job.seed)
    progress = None
    if show_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=False)
    if progress:
        with progress:
            plan = analyze(model, adapter, cka_b, grad_b, cfg, progress=progress)
    else:
        plan = analyze(model, adapter, cka_b, grad_b, cfg)
    pruned = apply_plan(model, adapter, plan, cka_b)
    pruned.eval()
    n_after = len(adapter.units(pruned)) if adapter.family != "generic" else plan.n_units_after
    if n_after != plan.n_units_after:  # surgery must match the plan exactly
        raise RuntimeError(f"pruned model has {n_after} units, plan says {plan.n_units_after}")
    plan_d = plan.to_dict()
    plan_d.update(model_source=str(job.model), data=job.data, total_wall_s=time.perf_counter() - t0,
                  calibration={"cka_batches": len(cka_b), "grad_batches": len(grad_b),
                               "batch_size": _batch_len(cka_b[0]), "split": "train"})
    with atomic_dir(job.out) as tmp:
        model_dir = tmp / "model"
        if adapter.modality == "tokens":
            from .models.hf_llm import save_hf

            save_hf(pruned, model_dir, tokenizer=loaded.tokenizer, extra={"plan": "../plan.json", "removed": plan.removed})
        elif adapter.modality == "sentences":
            from .models.hf_encoder import save_hf_encoder

            save_hf_encoder(pruned, model_dir, tokenizer=loaded.tokenizer,
                            extra={"plan": "../plan.json", "removed": plan.removed})
        else:
            spec = loaded.meta.get("spec") if loaded.meta else None
            prior = (loaded.meta or {}).get("removal_rounds") or []
            save_checkpoint(pruned, adapter, model_dir, spec=spec or adapter.spec(model),
                            removed_units=[*prior, plan.removed],
                            extra={"pruned_from": str(job.model), "method": plan.method})
        (tmp / "plan.json").write_text(json.dumps(plan_d, indent=2) + "\n")
        if plan.cka is not None:
            (tmp / "cka_heatmap.png").write_bytes(cka_heatmap_png(plan_d))
    return PruneResult(plan, pruned, loaded, job.out)


def _batch_len(b: Any) -> int:
    if isinstance(b, (tuple, list)):
        return int(b[0].shape[0])
    if isinstance(b, dict):
        return int(b["input_ids"].shape[0])
    return int(b.shape[0])
