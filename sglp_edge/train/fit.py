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
  evaluation summed with all_reduce, and only rank 0 writing files; or, given
  ``parallel=FullySharded(...)``, the model sharded across the ranks (FSDP2) with the same state file.

The engine's parts live in :mod:`sglp_edge.train.distributed` (process group, :class:`Replicated`),
:mod:`sglp_edge.train.fsdp` (:class:`FullySharded`), :mod:`sglp_edge.train.objectives`
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
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from benchmarks.board.errors import UserError
from sglp_edge.train.config import FitResult, LoopConfig, lr_at, make_optimizer
from sglp_edge.train.distributed import DistInfo, Replicated, all_reduce, init_distributed, sync_buffers
from sglp_edge.train.fsdp import FullySharded, evaluate_sharded
from sglp_edge.train.interrupted import Interrupted
from sglp_edge.train.objectives import ClassificationObjective, Objective, capped, evaluate, to_device
from sglp_edge.train.state import (STATE_FORMAT, Progress, StopFlag, load_state, rank_seed, rng_state, save_state,
                                   set_rng_state)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def fit(model: nn.Module, task: Objective, train_set: Dataset, val_set: Dataset | None, test_set: Dataset | None,
        cfg: LoopConfig, *, state_path: str | Path | None = None, desc: str = "train",
        progress: bool = True, extra_state: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        parallel: Replicated | FullySharded | None = None) -> FitResult:
    """Train ``model`` on ``train_set`` under ``cfg``'s budget; see the module docstring.

    ``state_path``: where the resumable state lives; if the file exists, training resumes from
    it (its config must match the budget/batch/seed given now). ``extra_state`` is stored in it
    and checked on resume (e.g. which teacher). ``parallel``: how the ranks hold the model
    (default :class:`Replicated`: all of it, DDP under torchrun). Raises :class:`Interrupted` after
    saving on SIGTERM / Ctrl-C."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    run = _Run(model, task, train_set, val_set, cfg, parallel or Replicated(info), state_path, extra_state, on_epoch)
    run.resume()
    bar = Progress(run.total_steps, desc, progress and info.is_main, cfg.log_every)
    if run.resumed_from:
        bar.message(f"resuming from step {run.resumed_from} (epoch {run.epoch}, {run.elapsed / 60:.1f} min trained) - {run.sp}")
    try:
        run.train(bar)
    finally:
        bar.close()
    return run.finish(bar, test_set)


class _Run:
    """One call of :func:`fit`: the model (DDP-wrapped or sharded under torchrun), its optimiser, the budget and
    the progress so far (step, epoch, time trained, history, best-on-val weights), which the state
    file holds."""

    def __init__(self, model: nn.Module, task: Objective, train_set: Dataset, val_set: Dataset | None,
                 cfg: LoopConfig, par: Replicated | FullySharded, state_path: str | Path | None, extra_state: dict[str, Any] | None,
                 on_epoch: Callable[[dict[str, Any]], None] | None):
        info: DistInfo = par.info
        if cfg.batch_size % info.world:
            raise UserError(f"batch size {cfg.batch_size} is not divisible by the {info.world} processes")
        self.task, self.train_set, self.cfg, self.info, self.par, self.on_epoch = task, train_set, cfg, info, par, on_epoch
        self.eval_fn = evaluate_sharded if par.collective_forward else evaluate
        self.local_bs = cfg.batch_size // info.world
        self.val_set = capped(val_set, cfg.val_samples)
        n_train = len(train_set)
        self.steps_per_epoch = n_train // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"the training split has {n_train} samples, fewer than one batch of {cfg.batch_size}")
        self.total_steps = _total_steps(cfg, self.steps_per_epoch)
        self.budget_s = cfg.minutes * 60 if cfg.minutes is not None else None
        # each rank draws its own augmentation (and dropout) stream: with one seed on every rank, the
        # k-th image of each local batch would get the same random crop on both ranks
        torch.manual_seed(rank_seed(cfg.seed, info.rank, 0))
        self.base, self.model = model, par.wrap(model)
        self.opt = make_optimizer(model.parameters(), cfg)
        self.sp = Path(state_path) if state_path else None
        self.step, self.epoch, self.step_in_epoch, self.elapsed = 0, 0, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"score", "epoch", "step", "model"}
        self.check = {"batch_size": cfg.batch_size, "seed": cfg.seed, "epochs": cfg.epochs, "steps": cfg.steps,
                      "minutes": cfg.minutes, "lr": cfg.lr, "n_train": n_train, **(extra_state or {})}
        self.resumed_from = 0
        self.last_save = time.perf_counter()
        self.run_avg: dict[str, float] = {}

    # -- state file -----------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the state file when there is one (made with the same settings)."""
        sp = self.sp
        if sp is None or not sp.is_file():
            return
        st = load_state(sp, mmap=self.par.collective_state)  # mapped: every rank reads it, none copies it
        diff = {k: (st["check"].get(k), v) for k, v in self.check.items() if st["check"].get(k) != v}
        if diff:
            k, (old, new) = next(iter(diff.items()))
            raise UserError(f"the saved state {sp} was made with {k}={old!r}, now {new!r}: re-run with the "
                            f"same settings to resume, or delete {sp} to start over")
        self.par.load_model_state(self.base, st["model"])
        self.par.load_optim_state(self.base, self.opt, st["optimizer"])
        self.step, self.epoch, self.step_in_epoch, self.elapsed = st["step"], st["epoch"], st["step_in_epoch"], st["elapsed"]
        self.history, self.best = st["history"], st.get("best")
        set_rng_state(st["rng"])
        if self.info.rank:  # the state file holds rank 0's generator; the others re-derive their own
            torch.manual_seed(rank_seed(self.cfg.seed, self.info.rank, self.step))
        self.resumed_from = self.step

    def snapshot(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "check": self.check, "model": self.par.model_state(self.base),
                "optimizer": self.par.optim_state(self.base, self.opt), "step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "elapsed": self.elapsed, "history": self.history,
                "best": self.best, "rng": rng_state(), "config": asdict(self.cfg)}

    def persist(self) -> None:
        if self.sp is not None and (self.info.is_main or self.par.collective_state):
            st = self.snapshot()  # sharded: every rank takes part in gathering it
            if self.info.is_main:
                save_state(self.sp, st)
        if self.info.distributed:
            dist.barrier()

    # -- budget ---------------------------------------------------------------------------------
    def progress_frac(self) -> float:
        fr = 0.0
        if self.total_steps:
            fr = max(fr, self.step / self.total_steps)
        if self.budget_s:
            fr = max(fr, self.elapsed / self.budget_s)
        return fr

    def done(self) -> bool:
        return self.progress_frac() >= 1.0

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_now(self, tag: str) -> dict[str, Any]:
        """Val metrics of the current weights, recorded in the history (and kept when best)."""
        sync_buffers(self.base, self.info)  # evaluate and save rank 0's running stats everywhere
        rec: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "elapsed_s": round(self.elapsed, 1), "tag": tag}
        if self.val_set is not None and len(self.val_set):
            m = self.eval_fn(self.base, self.task, self.val_set, batch_size=self.cfg.eval_batch_size, info=self.info)
            rec["val"] = m
            if self.cfg.select_best and (self.best is None or m["score"] > self.best["score"]):
                self.best = {"score": m["score"], "epoch": self.epoch, "step": self.step,
                             "model": self.par.model_copy(self.base)}
        self.history.append(rec)
        if self.on_epoch is not None and self.info.is_main:
            self.on_epoch(rec)
        return rec

    # -- training -------------------------------------------------------------------------------
    def train(self, bar: Progress) -> None:
        """Epochs until the budget is spent; on SIGTERM / Ctrl-C save and raise :class:`Interrupted`."""
        self.last_save = time.perf_counter()
        with StopFlag() as flag:
            self.task.train_mode(self.model)
            while not self.done():
                if self.train_epoch(flag, bar):
                    self.persist()
                    raise Interrupted(self.sp if self.info.is_main else None, self.step)

    def epoch_loader(self) -> DataLoader:
        """This rank's shard of the epoch's shuffled order, from the step the epoch is at."""
        sampler = DistributedSampler(self.train_set, num_replicas=self.info.world, rank=self.info.rank, shuffle=True,
                                     seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        idx = list(sampler)[self.step_in_epoch * self.local_bs: self.steps_per_epoch * self.local_bs]
        # own generator: the global RNG (augmentation) then advances identically with or without a resume
        return DataLoader(self.train_set, batch_size=self.local_bs, sampler=idx, num_workers=0, drop_last=True,
                          generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch))

    def train_epoch(self, flag: StopFlag, bar: Progress) -> bool:
        """Steps until the epoch or the budget ends (then the epoch's evaluation and save); True when
        a stop signal ended it."""
        for batch in self.epoch_loader():
            self.train_step(batch, bar)
            # one collective per step keeps ranks agreeing on stop/save decisions
            want_save = self.cfg.ckpt_minutes > 0 and time.perf_counter() - self.last_save > self.cfg.ckpt_minutes * 60
            s_stop, s_save, s_el = all_reduce([float(flag.stop), float(want_save), self.elapsed], self.info, "max")
            self.elapsed = s_el
            if s_stop:
                return True
            if self.done():
                break
            if s_save:
                self.persist()
                self.last_save = time.perf_counter()
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            bar.message(_fmt_rec(self.evaluate_now("epoch")))
            self.persist()
            self.last_save = time.perf_counter()
            self.task.train_mode(self.model)
        return False

    def train_step(self, batch: Any, bar: Progress) -> None:
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.progress_frac(), self.cfg)
        loss, shown = self.task.train_loss(self.model, to_device(batch, self.info.device))
        if not torch.isfinite(loss):
            raise UserError(f"the training loss became {float(loss)} at step {self.step}; lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.base.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.step_in_epoch += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        for k, v in shown.items():
            self.run_avg[k] = v if k not in self.run_avg else 0.95 * self.run_avg[k] + 0.05 * v
        ips = self.local_bs * self.info.world / max(dt, 1e-9)
        bar.update(self.step, " ".join(f"{k}={v:.4f}" for k, v in self.run_avg.items())
                   + f" lr={self.opt.param_groups[0]['lr']:.3g} {ips:.3g}/s")

    # -- the result -----------------------------------------------------------------------------
    def finish(self, bar: Progress, test_set: Dataset | None) -> FitResult:
        """Evaluate the final weights (unless just done), save, select, and score the test split once."""
        # budget spent mid-epoch: evaluate the final weights too (unless this point was just evaluated)
        if not self.history or self.history[-1]["step"] != self.step:
            bar.message(_fmt_rec(self.evaluate_now("end")))
        sync_buffers(self.base, self.info)
        self.persist()
        selected = self.select()
        self.base.eval()
        val_m = self.selected_val()
        test_m = None
        if self.cfg.eval_test and test_set is not None and len(test_set):
            test_m = self.eval_fn(self.base, self.task, test_set, batch_size=self.cfg.eval_batch_size, info=self.info)
        return FitResult(model=self.par.plain_model(self.base), val=val_m, test=test_m, history=self.history, steps=self.step,
                         epochs=self.step / self.steps_per_epoch, train_seconds=self.elapsed, selected=selected,
                         resumed_from_step=self.resumed_from)

    def select(self) -> str:
        """Load the best-on-val weights when they are not the last ones; say which were selected."""
        best = self.best
        if self.cfg.select_best and best is not None and best["step"] != self.step:
            self.par.load_model_state(self.base, best["model"])
            return f"best-val@step {best['step']} (epoch {best['epoch']})"
        if self.cfg.select_best and best is not None:
            return f"best-val@step {best['step']} (last)"
        return "last"

    def selected_val(self) -> dict[str, float]:
        # the selected weights were evaluated when they were reached: reuse that record (an LM val pass
        # costs minutes); evaluate again only if no record holds them
        sel_step = self.best["step"] if self.cfg.select_best and self.best is not None else self.step
        sel_rec = next((r for r in reversed(self.history) if r["step"] == sel_step and "val" in r), None)
        if sel_rec is not None:
            return sel_rec["val"]
        if self.val_set is not None and len(self.val_set):
            return self.eval_fn(self.base, self.task, self.val_set, batch_size=self.cfg.eval_batch_size, info=self.info)
        return {}


def _total_steps(cfg: LoopConfig, steps_per_epoch: int) -> int | None:
    """The step budget: ``steps``, ``epochs`` in steps, or the smaller of both (None: minutes only)."""
    total_steps = None
    if cfg.steps is not None:
        total_steps = int(cfg.steps)
    if cfg.epochs is not None:
        e_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
        total_steps = e_steps if total_steps is None else min(total_steps, e_steps)
    return total_steps


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
