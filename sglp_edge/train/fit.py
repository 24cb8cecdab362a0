"""Supervised training of the baseline, and the resumable training engine the KD fine-tune reuses.

The engine (:func:`fit`) runs any :class:`Objective` (a loss for training, summable metrics for
evaluation) with

* a budget in epochs, optimiser steps or minutes (whichever is given; fractional epochs allowed),
* SGD with Nesterov momentum (or AdamW) and a linear-warmup + cosine learning-rate schedule driven
  by the fraction of the budget spent (so a minutes budget anneals properly too); with a warmup
  of ~15-30 % this is the one-cycle shape,
* a rich progress bar (plain log lines when the output is not a terminal),
* a resumable state file written atomically at every epoch end, every ``ckpt_minutes`` inside an
  epoch, and on SIGTERM / Ctrl-C; resuming continues from the saved optimiser step with the same
  data order and RNG state, so a kill loses at most the work since the last save,
* evaluation on ``val`` after every epoch and best-on-val selection (``test`` is evaluated once,
  at the end, on the selected weights - it never influences a decision),
* DistributedDataParallel when launched by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl on
  CUDA, a DistributedSampler shard per rank, the global batch split across ranks, sharded
  evaluation summed with all_reduce, and only rank 0 writing files.

The engine's parts live in :mod:`sglp_edge.train.distributed` (process group), :mod:`sglp_edge.train.objectives`
(objectives, evaluation), :mod:`sglp_edge.train.config` (config, results, schedule, optimiser) and
:mod:`sglp_edge.train.state` (resume state, RNG, stop flag, progress); import each name from the
module that defines it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sglp_edge.train.distributed import all_reduce, init_distributed
from benchmarks.board.errors import UserError
from sglp_edge.train.config import FitResult, LoopConfig, lr_at, make_optimizer
from sglp_edge.train.interrupted import Interrupted
from sglp_edge.train.state import (STATE_FORMAT, Progress, StopFlag, load_state, rank_seed, rng_state, save_state,
                                   set_rng_state)
from sglp_edge.train.objectives import ClassificationObjective, Objective, capped, evaluate, to_device

# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def fit(model: nn.Module, task: Objective, train_set: Dataset, val_set: Dataset | None, test_set: Dataset | None,
        cfg: LoopConfig, *, state_path: str | Path | None = None, desc: str = "train",
        progress: bool = True, extra_state: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train ``model`` on ``train_set`` under ``cfg``'s budget; see the module docstring.

    ``state_path``: where the resumable state lives; if the file exists, training resumes from
    it (its config must match the budget/batch/seed given now). ``extra_state`` is stored in it
    and checked on resume (e.g. which teacher). Raises :class:`Interrupted` after saving on
    SIGTERM / Ctrl-C."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    if cfg.batch_size % info.world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {info.world} processes")
    local_bs = cfg.batch_size // info.world
    val_set = capped(val_set, cfg.val_samples)
    n_train = len(train_set)
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"the training split has {n_train} samples, fewer than one batch of {cfg.batch_size}")
    total_steps = None
    if cfg.steps is not None:
        total_steps = int(cfg.steps)
    if cfg.epochs is not None:
        e_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
        total_steps = e_steps if total_steps is None else min(total_steps, e_steps)
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else None

    # each rank draws its own augmentation (and dropout) stream: with one seed on every rank, the
    # k-th image of each local batch would get the same random crop on both ranks
    torch.manual_seed(rank_seed(cfg.seed, info.rank, 0))
    model.to(info.device)
    base = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(base, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    opt = make_optimizer(base.parameters(), cfg)

    sp = Path(state_path) if state_path else None
    step, epoch, step_in_epoch, elapsed = 0, 0, 0, 0.0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # {"score", "epoch", "step", "model"}
    check = {"batch_size": cfg.batch_size, "seed": cfg.seed, "epochs": cfg.epochs, "steps": cfg.steps,
             "minutes": cfg.minutes, "lr": cfg.lr, "n_train": n_train, **(extra_state or {})}
    resumed_from = 0
    if sp is not None and sp.is_file():
        st = load_state(sp)
        diff = {k: (st["check"].get(k), v) for k, v in check.items() if st["check"].get(k) != v}
        if diff:
            k, (old, new) = next(iter(diff.items()))
            raise UserError(f"the saved state {sp} was made with {k}={old!r}, now {new!r}: re-run with the "
                            f"same settings to resume, or delete {sp} to start over")
        base.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, epoch, step_in_epoch, elapsed = st["step"], st["epoch"], st["step_in_epoch"], st["elapsed"]
        history, best = st["history"], st.get("best")
        set_rng_state(st["rng"])
        if info.rank:  # the state file holds rank 0's generator; the others re-derive their own
            torch.manual_seed(rank_seed(cfg.seed, info.rank, step))
        resumed_from = step

    def snapshot() -> dict[str, Any]:
        return {"format": STATE_FORMAT, "check": check, "model": base.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "elapsed": elapsed,
                "history": history, "best": best, "rng": rng_state(), "config": asdict(cfg)}

    def persist() -> None:
        if sp is not None and info.is_main:
            save_state(sp, snapshot())
        if info.distributed:
            import torch.distributed as dist

            dist.barrier()

    def progress_frac() -> float:
        fr = 0.0
        if total_steps:
            fr = max(fr, step / total_steps)
        if budget_s:
            fr = max(fr, elapsed / budget_s)
        return fr

    def done() -> bool:
        return progress_frac() >= 1.0

    def sync_buffers() -> None:
        # BatchNorm running stats drift apart between ranks after their last local forward;
        # evaluate and save rank 0's everywhere so all ranks hold identical models
        if info.distributed:
            import torch.distributed as dist

            for b in base.buffers():
                dist.broadcast(b, 0)

    def do_eval(tag: str) -> dict[str, Any]:
        nonlocal best
        sync_buffers()
        rec: dict[str, Any] = {"epoch": epoch, "step": step, "elapsed_s": round(elapsed, 1), "tag": tag}
        if val_set is not None and len(val_set):
            m = evaluate(base, task, val_set, batch_size=cfg.eval_batch_size, info=info)
            rec["val"] = m
            if cfg.select_best and (best is None or m["score"] > best["score"]):
                best = {"score": m["score"], "epoch": epoch, "step": step,
                        "model": {k: v.detach().clone().cpu() for k, v in base.state_dict().items()}}
        history.append(rec)
        if on_epoch is not None and info.is_main:
            on_epoch(rec)
        return rec

    from torch.utils.data.distributed import DistributedSampler

    bar = Progress(total_steps, desc, progress and info.is_main, cfg.log_every)
    if resumed_from:
        bar.message(f"resuming from step {resumed_from} (epoch {epoch}, {elapsed / 60:.1f} min trained) - {sp}")
    stopped = False
    last_save = time.perf_counter()
    run_avg: dict[str, float] = {}
    try:
        with StopFlag() as flag:
            task.train_mode(model)
            while not done():
                sampler = DistributedSampler(train_set, num_replicas=info.world, rank=info.rank, shuffle=True,
                                             seed=cfg.seed, drop_last=True)
                sampler.set_epoch(epoch)
                idx = list(sampler)[step_in_epoch * local_bs: steps_per_epoch * local_bs]
                # own generator: the global RNG (augmentation) then advances identically with or without a resume
                loader = DataLoader(train_set, batch_size=local_bs, sampler=idx, num_workers=0, drop_last=True,
                                    generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
                for batch in loader:
                    t0 = time.perf_counter()
                    for g in opt.param_groups:
                        g["lr"] = lr_at(progress_frac(), cfg)
                    loss, shown = task.train_loss(model, to_device(batch, info.device))
                    if not torch.isfinite(loss):
                        raise UserError(f"the training loss became {float(loss)} at step {step}; lower the learning rate")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_(base.parameters(), cfg.grad_clip)
                    opt.step()
                    step += 1
                    step_in_epoch += 1
                    dt = time.perf_counter() - t0
                    elapsed += dt
                    for k, v in shown.items():
                        run_avg[k] = v if k not in run_avg else 0.95 * run_avg[k] + 0.05 * v
                    ips = local_bs * info.world / max(dt, 1e-9)
                    bar.update(step, " ".join(f"{k}={v:.4f}" for k, v in run_avg.items())
                               + f" lr={opt.param_groups[0]['lr']:.3g} {ips:.3g}/s")
                    # one collective per step keeps ranks agreeing on stop/save decisions
                    want_save = cfg.ckpt_minutes > 0 and time.perf_counter() - last_save > cfg.ckpt_minutes * 60
                    s_stop, s_save, s_el = all_reduce([float(flag.stop), float(want_save), elapsed], info, "max")
                    elapsed = s_el
                    if s_stop:
                        stopped = True
                        break
                    if done():
                        break
                    if s_save:
                        persist()
                        last_save = time.perf_counter()
                if stopped:
                    break
                if step_in_epoch >= steps_per_epoch:
                    epoch += 1
                    step_in_epoch = 0
                    rec = do_eval("epoch")
                    bar.message(_fmt_rec(rec))
                    persist()
                    last_save = time.perf_counter()
                    task.train_mode(model)
            if stopped:
                persist()
                raise Interrupted(sp if info.is_main else None, step)
    finally:
        bar.close()
    # budget spent mid-epoch: evaluate the final weights too (unless this point was just evaluated)
    if not history or history[-1]["step"] != step:
        rec = do_eval("end")
        bar.message(_fmt_rec(rec))
    sync_buffers()
    persist()
    selected = "last"
    if cfg.select_best and best is not None and best["step"] != step:
        base.load_state_dict(best["model"])
        selected = f"best-val@step {best['step']} (epoch {best['epoch']})"
    elif cfg.select_best and best is not None:
        selected = f"best-val@step {best['step']} (last)"
    base.eval()
    # the selected weights were evaluated when they were reached: reuse that record (an LM val pass
    # costs minutes); evaluate again only if no record holds them
    sel_step = best["step"] if cfg.select_best and best is not None else step
    sel_rec = next((r for r in reversed(history) if r["step"] == sel_step and "val" in r), None)
    if sel_rec is not None:
        val_m = sel_rec["val"]
    else:
        val_m = evaluate(base, task, val_set, batch_size=cfg.eval_batch_size, info=info) if val_set is not None and len(val_set) else {}
    test_m = None
    if cfg.eval_test and test_set is not None and len(test_set):
        test_m = evaluate(base, task, test_set, batch_size=cfg.eval_batch_size, info=info)
    return FitResult(model=base, val=val_m, test=test_m, history=history, steps=step,
                     epochs=step / steps_per_epoch, train_seconds=elapsed, selected=selected, resumed_from_step=resumed_from)


def _fmt_rec(rec: dict[str, Any]) -> str:
    v = rec.get("val", {})
    parts = [f"epoch {rec['epoch']} step {rec['step']} ({rec['elapsed_s'] / 60:.1f} min)"]
    parts += [f"val_{k}={x:.4f}" for k, x in v.items() if k not in ("n", "score")]
    return "  ".join(parts)


# ---------------------------------------------------------------------------------------------
# baseline training
# ---------------------------------------------------------------------------------------------
#: the recipe of the shipped default model (``sglp-edge train cifar_resnet56 --data fashion-mnist``)
BASELINE_RECIPE = dict(batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                       warmup=0.15, warmup_start=0.1, final_lr_frac=0.0)


@dataclass
class TrainResult:
    model: nn.Module
    val_acc: float
    test_acc: float | None
    fit: FitResult
    data: dict[str, Any]
    recipe: dict[str, Any]


def training_manifest(model: str, bundle: Any, seed: int, res: TrainResult, started: float,
                      reproduce: str) -> dict[str, Any]:
    """What a trained checkpoint's manifest records: data, recipe, selection, accuracies, time, history."""
    return {
        "model": model, "dataset": bundle.describe(), "seed": seed,
        "epochs": round(res.fit.epochs, 3), "steps": res.fit.steps, "recipe": res.recipe,
        "selected": res.fit.selected, "val_acc": round(res.val_acc, 5),
        "test_acc": None if res.test_acc is None else round(res.test_acc, 5),
        "train_minutes": round(res.fit.train_seconds / 60, 2), "wall_minutes_this_run": round((time.time() - started) / 60, 2),
        "resumed_from_step": res.fit.resumed_from_step,
        "history": [{"epoch": h["epoch"], "step": h["step"], "val_acc": round(h.get("val", {}).get("acc", float("nan")), 5)}
                    for h in res.fit.history],
        "reproduce": reproduce, "torch": torch.__version__,
    }


def train_classifier(model: nn.Module, data: Any, cfg: LoopConfig, *, state_path: str | Path | None = None,
                     label_smoothing: float = 0.0, progress: bool = True, desc: str = "train") -> TrainResult:
    """Plain supervised training of an image classifier on ``data`` (an ImageDataBundle):
    random-crop(pad 4)+flip augmentation (the bundle's train transform), cross-entropy, SGD with
    Nesterov momentum and the warmup+cosine (one-cycle-shaped) schedule of ``cfg``; returns the
    val-selected model with its val and held-out test accuracy."""
    if getattr(data, "modality", "image") != "image":
        raise UserError("`train` trains image classifiers; fine-tune language models with `sglp-edge finetune`")
    nc = getattr(model, "num_classes", None) or _out_features(model)
    if nc is not None and nc != data.num_classes:
        raise UserError(f"the model has {nc} outputs but {data.name} has {data.num_classes} classes; "
                        f"build it with --num-classes {data.num_classes}")
    task = ClassificationObjective(label_smoothing)
    res = fit(model, task, data.train, data.val, data.test, cfg, state_path=state_path, desc=desc, progress=progress,
              extra_state={"dataset": data.name, "label_smoothing": label_smoothing})
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("device", "log_every", "eval_batch_size", "ckpt_minutes")}
    recipe.update(label_smoothing=label_smoothing, augmentation=data.meta.get("augmentation", "none"),
                  schedule=f"linear warmup {cfg.warmup:.0%} then cosine (one-cycle shape)")
    return TrainResult(res.model, res.val.get("acc", float("nan")), (res.test or {}).get("acc"), res, data.describe(), recipe)


def _out_features(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None
