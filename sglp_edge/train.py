"""Supervised training of the baseline, and the resumable training engine the KD fine-tune reuses.

The engine (:func:`fit`) runs any :class:`Task` (a loss for training, summable metrics for
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
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import UserError

STATE_FORMAT = "sglp-edge/train-state/1"


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else run alone.
    gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if world <= 1:
        dev = torch.device(device) if device else torch.device("cuda" if want_cuda else "cpu")
        return DistInfo(0, 1, 0, dev)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def _all_reduce(values: list[float], info: DistInfo, op: str = "sum") -> list[float]:
    if not info.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
class Task:
    """What is trained and how it is measured. ``train_loss`` returns the loss to minimise plus
    scalars to display; ``eval_sums`` returns additive sums over a batch, which
    ``finalize`` turns into metrics including ``score`` (higher is better, used for selection)."""

    def train_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        model.train()


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class ClassificationTask(Task):
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def train_loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, {"loss": float(loss.detach()), "acc": float((logits.argmax(1) == y).float().mean())}

    def eval_sums(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"n": float(len(y)), "correct": float((logits.argmax(1) == y).sum()),
                "loss_sum": float(nn.functional.cross_entropy(logits, y, reduction="sum"))}

    def finalize(self, sums):
        n = max(sums.get("n", 0.0), 1.0)
        acc = sums.get("correct", 0.0) / n
        return {"acc": acc, "loss": sums.get("loss_sum", 0.0) / n, "n": sums.get("n", 0.0), "score": acc}


def capped(dataset: Dataset | None, n: int | None) -> Dataset | None:
    """The first ``n`` items of ``dataset`` (deterministic), or the data set itself."""
    if dataset is None or n is None or len(dataset) <= n:
        return dataset
    return Subset(dataset, range(n))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, dataset: Dataset, *, batch_size: int = 256,
             info: DistInfo | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset`` (eval mode). Under DDP each rank takes a strided shard
    and the sums are all-reduced, so every rank gets the full-set metrics."""
    info = info or DistInfo()
    was = model.training
    model.eval()
    idx = list(range(info.rank, len(dataset), info.world))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=idx, num_workers=0)
    sums: dict[str, float] = {}
    for batch in loader:
        for k, v in task.eval_sums(model, to_device(batch, info.device)).items():
            sums[k] = sums.get(k, 0.0) + v
    keys = sorted(sums) if sums else []
    if info.distributed:
        keys = _common_keys(keys, task, model, dataset, info)
        sums = dict(zip(keys, _all_reduce([sums.get(k, 0.0) for k in keys], info)))
    model.train(was)
    return task.finalize(sums)


def _common_keys(keys, task, model, dataset, info):  # every rank needs the same key list
    if keys:
        return keys
    batch = next(iter(DataLoader(dataset, batch_size=1)))
    return sorted(task.eval_sums(model, to_device(batch, info.device)))


# ---------------------------------------------------------------------------------------------
# configuration and results
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    epochs: float | None = None
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 128  # global batch (split across DDP ranks)
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of the budget spent warming up linearly from lr*warmup_start
    warmup_start: float = 0.04
    final_lr_frac: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float | None = None
    seed: int = 0
    eval_batch_size: int = 256
    val_samples: int | None = None  # evaluate on the first N validation items only (quick runs); None: all
    ckpt_minutes: float = 5.0
    select_best: bool = True
    eval_test: bool = True
    log_every: int = 50
    threads: int | None = None
    device: str | None = None

    def check(self) -> None:
        given = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        if not given:
            raise UserError("give a training budget: --epochs N, --steps N or --minutes N")
        for k in given:
            if getattr(self, k) <= 0:
                raise UserError(f"--{k} must be positive, got {getattr(self, k)}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.val_samples is not None and self.val_samples < 1:
            raise UserError(f"--val-samples must be >= 1, got {self.val_samples}")
        if self.lr <= 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"warmup is a fraction of the budget in [0, 1), got {self.warmup}")


@dataclass
class FitResult:
    model: nn.Module  # the selected weights (best on val, or last), unwrapped from DDP
    val: dict[str, float]
    test: dict[str, float] | None
    history: list[dict[str, Any]]
    steps: int
    epochs: float
    train_seconds: float
    selected: str  # "best-val@epoch N" or "last"
    resumed_from_step: int = 0
    stopped_early: bool = False  # interrupted (state saved; resume to continue)
    extra: dict[str, Any] = field(default_factory=dict)


class Interrupted(Exception):
    """Training stopped by SIGTERM / Ctrl-C after its state was saved."""

    def __init__(self, state_path: Path | None, step: int):
        super().__init__(f"interrupted at step {step}; state saved to {state_path}; re-run the same command to resume")
        self.state_path, self.step = state_path, step


# ---------------------------------------------------------------------------------------------
# learning-rate schedule
# ---------------------------------------------------------------------------------------------
def lr_at(progress: float, cfg: LoopConfig) -> float:
    """Linear warmup from ``lr*warmup_start`` to ``lr`` over the first ``warmup`` of the budget,
    then cosine down to ``lr*final_lr_frac`` at the end."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.warmup > 0 and p < cfg.warmup:
        return cfg.lr * (cfg.warmup_start + (1 - cfg.warmup_start) * p / cfg.warmup)
    q = (p - cfg.warmup) / max(1e-12, 1 - cfg.warmup)
    lo = cfg.lr * cfg.final_lr_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * q))


def make_optimizer(params, cfg: LoopConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# state files
# ---------------------------------------------------------------------------------------------
def save_state(path: Path, state: dict[str, Any]) -> None:
    from exporters.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
        raise UserError(f"cannot read the resume state {path} ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not an sglp-edge training state; delete it to start over")
    return state


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked after every step (main thread only)."""

    def __init__(self):
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if sys.platform != "win32":
            import threading

            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------------------------------
# progress display
# ---------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int | None, desc: str, enabled: bool, log_every: int):
        self.enabled, self.log_every, self.total = enabled, log_every, total
        self.progress = None
        self.task_id = None
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.task_id = self.progress.add_task(desc, total=total, info="")
            self.progress.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, info=info)
        elif self.log_every and step % self.log_every == 0:
            tot = f"/{self.total}" if self.total else ""
            self.console.print(f"step {step}{tot} {info} [{time.perf_counter() - self.t0:.0f}s]", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Rank 0 keeps ``seed`` (one process trains exactly as before); other ranks get streams of
    their own that no other seed's rank 0 shares."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2 ** 63)


def _rng_state() -> dict[str, Any]:
    import random

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(s["torch"])
    random.setstate(tuple(s["python"]) if not isinstance(s["python"], tuple) else s["python"])


def fit(model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset | None, test_set: Dataset | None,
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
    torch.manual_seed(_rank_seed(cfg.seed, info.rank, 0))
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
        _set_rng_state(st["rng"])
        if info.rank:  # the state file holds rank 0's generator; the others re-derive their own
            torch.manual_seed(_rank_seed(cfg.seed, info.rank, step))
        resumed_from = step

    def snapshot() -> dict[str, Any]:
        return {"format": STATE_FORMAT, "check": check, "model": base.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "elapsed": elapsed,
                "history": history, "best": best, "rng": _rng_state(), "config": asdict(cfg)}

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

    bar = _Progress(total_steps, desc, progress and info.is_main, cfg.log_every)
    if resumed_from:
        bar.message(f"resuming from step {resumed_from} (epoch {epoch}, {elapsed / 60:.1f} min trained) - {sp}")
    stopped = False
    last_save = time.perf_counter()
    run_avg: dict[str, float] = {}
    try:
        with _StopFlag() as flag:
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
                    s_stop, s_save, s_el = _all_reduce([float(flag.stop), float(want_save), elapsed], info, "max")
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
    task = ClassificationTask(label_smoothing)
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
