"""Brief recovery fine-tune of a pruned network with knowledge distillation from the original.

Loss (images):  ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``
(Hinton et al. 2015; the T^2 keeps the soft-target gradients on the scale of the hard ones), plus
optionally ``feature_weight * mean_u MSE(student_u, teacher_u)`` over the kept units, each
student unit matched to the teacher unit it came from (:func:`kept_unit_map`).

Language models: the same loss on next-token distributions: position ``i``'s logits predict token
``i+1`` of packed fixed-length blocks; the hard-label term is the next-token cross-entropy, and
the reported metric is perplexity (``exp`` of the mean token NLL).

Sentence encoders: ``1 - cos`` between the student's and the teacher's sentence embeddings
(:class:`sglp_edge.tasks.feature_extraction.EncoderKDObjective`); the reported metric is the mean cosine.

Training runs on :func:`sglp_edge.train.fit.fit`: budget in epochs / steps / minutes, warmup + cosine
schedule, checkpoint every epoch (and every ``ckpt_minutes``, and on SIGTERM / Ctrl-C) with resume
from the saved step, best-on-validation selection (the test split is only evaluated at the end),
and DistributedDataParallel when launched by ``torchrun``; decoder language models run fully sharded
(FSDP2, :mod:`sglp_edge.train.fsdp`) under ``torchrun`` instead (``shard``: auto | ddp | fsdp).

Programmatic use::

    from sglp_edge.train.finetune import FinetuneConfig, finetune
    res = finetune(pruned, original, adapter, bundle, FinetuneConfig(epochs=1))
    res.val["acc"], res.test["acc"]          # images
    res.val["ppl"], res.test["ppl"]          # language models

The loss, the kept-unit map, the feature hooks and the image / LM KD objectives are in :mod:`sglp_edge.train.kd`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter
from sglp_edge.tasks.feature_extraction import EncoderKDObjective
from sglp_edge.train.config import FitResult, LoopConfig
from sglp_edge.train.distributed import DistInfo, Replicated, init_distributed
from sglp_edge.train.fit import fit
from sglp_edge.train.fsdp import FullySharded, check_shard, evaluate_sharded, parallel_for
from sglp_edge.train.kd import ImageKDObjective, KDObjective, LMKDObjective
from sglp_edge.train.objectives import capped, evaluate
from sglp_edge.train.partial import train_only_last
from sglp_edge.train.teacher_targets import check_not_degenerate, choose_target


# ---------------------------------------------------------------------------------------------
# configuration and result
# ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig(LoopConfig):
    lr: float = 0.01  # fine-tuning: lower than training from scratch
    warmup: float = 0.05
    warmup_start: float = 0.1
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term; 1 - alpha on the hard-label cross-entropy
    feature_weight: float = 0.0  # weight of the feature-KD (MSE on kept units); 0 disables it
    feature_map: dict[str, str] | None = None  # student path -> teacher path (see kept_unit_map)
    state_path: str | None = None  # resume-state file; None: no checkpointing
    progress: bool = True
    eval_before: bool = True  # measure the student's val metric before fine-tuning (fresh runs)
    test_samples: int | None = None  # score the selected weights on the first N held-out items; None: all
    train_last: int | None = None  # partial fine-tune: only the last N units and the head train (sglp_edge.train.partial)
    # images: "labels" when the data's labels are the model's classes (same count, or an image folder with a
    # class map); "teacher" (label-free: pure KD, alpha 1, metric = top-1 agreement with the teacher) otherwise
    target: str = "auto"
    alpha_given: bool = False  # the user set alpha explicitly (a label-free run then refuses alpha < 1)
    # under torchrun: "auto" shards decoder LMs (FSDP2) and replicates other models (DDP); "ddp"; "fsdp"
    shard: str = "auto"


    def check(self) -> None:
        super().check()
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"--alpha (KD weight) must be in [0, 1], got {self.alpha}")
        if self.test_samples is not None and self.test_samples < 1:
            raise UserError(f"--test-samples must be >= 1, got {self.test_samples}")
        if self.train_last is not None and self.train_last < 1:
            raise UserError(f"--train-last must be >= 1 (units to train), got {self.train_last}")
        if self.feature_weight < 0:
            raise UserError(f"--feature-weight must be >= 0, got {self.feature_weight}")
        if self.target not in ("auto", "labels", "teacher"):
            raise UserError(f"finetune target must be auto, labels or teacher, got {self.target!r}")
        check_shard(self.shard)
        if self.feature_weight > 0 and not self.feature_map:
            raise UserError("feature distillation needs the student->teacher unit map (kept_unit_map)")


@dataclass
class FinetuneResult:
    model: nn.Module
    val: dict[str, float]  # images: acc, loss; LMs: ppl, nll
    test: dict[str, float] | None  # held-out split, measured once on the selected weights
    val_before: dict[str, float] | None
    history: list[dict[str, Any]]
    steps: int
    epochs: float
    train_seconds: float
    selected: str
    resumed_from_step: int
    world_size: int
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no weights)."""
        return {"val": self.val, "test": self.test, "val_before": self.val_before, "steps": self.steps,
                "epochs": round(self.epochs, 4), "train_seconds": round(self.train_seconds, 1),
                "selected": self.selected, "resumed_from_step": self.resumed_from_step,
                "world_size": self.world_size, "history": self.history, "config": self.config}


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def _splits(data: Any) -> tuple[Dataset, Dataset | None, Dataset | None, str]:
    modality = getattr(data, "modality", "image")
    if modality == "tokens":
        return _Blocks(data.train), _Blocks(data.val), _Blocks(data.test), "tokens"
    if modality == "sentences":  # SentenceDataBundle: items are dicts of padded token tensors
        return data.train, data.val, data.test, "sentences"
    return data.train, data.val, data.test, "image"


def finetune(student: nn.Module, teacher: nn.Module, adapter: ModelAdapter, data: Any,
             cfg: FinetuneConfig | None = None, **overrides: Any) -> FinetuneResult:
    """Fine-tune ``student`` (the pruned network, trained in place) with KD from ``teacher`` on
    ``data`` (an ImageDataBundle or TextDataBundle from :func:`sglp_edge.data.datasets.get_dataset`).
    ``cfg`` fields may also be passed as keyword overrides, e.g. ``finetune(..., steps=200)``.
    Returns the best-on-val weights with val metrics and held-out test metrics.
    Under ``torchrun`` every rank calls this; only rank 0 writes the state file."""
    cfg = _resolve_config(cfg, overrides)
    train_set, val_set, test_set, modality = _splits(data)
    val_set = capped(val_set, cfg.val_samples)
    # the held-out split of a text corpus runs to thousands of blocks: a forward pass of each through
    # an LM takes longer than the fine-tune itself, so LM runs cap it (finetune.test_samples)
    test_set = capped(test_set, cfg.test_samples)
    if modality == "tokens" and cfg.eval_batch_size > cfg.batch_size:
        cfg.eval_batch_size = cfg.batch_size  # (batch, block, vocab) logits get large quickly
    am = getattr(adapter, "modality", "image")
    if am != modality:
        raise UserError(f"the model takes {am} input but the data set {getattr(data, 'name', '?')} is {modality}; "
                        "use --data text for language models and encoders, an image data set otherwise")
    info: DistInfo = init_distributed(cfg.device)
    par = parallel_for(cfg.shard, getattr(adapter, "family", ""), info)
    n_params = sum(p.numel() for p in student.parameters())
    teacher, student = _place(par, teacher, student, adapter, cfg)
    task = _objective(modality, teacher, adapter, cfg)
    if modality == "image":
        _image_target(cfg, _check_outputs(student, teacher, data, info), data)
    state_path = Path(cfg.state_path) if cfg.state_path else None
    val_before = None
    if cfg.eval_before and val_set is not None and not (state_path and state_path.is_file()):
        ev = evaluate_sharded if par.collective_forward else evaluate
        val_before = _strip(ev(student, task, val_set, batch_size=cfg.eval_batch_size, info=info))
    task.attach(student)
    try:
        res: FitResult = fit(student, task, train_set, val_set, test_set, cfg, state_path=state_path,
                             desc="finetune (KD)", progress=cfg.progress, parallel=par,
                             extra_state={"kind": "kd-finetune", "dataset": getattr(data, "name", "?"),
                                          "temperature": cfg.temperature, "alpha": cfg.alpha,
                                          "feature_weight": cfg.feature_weight,
                                          "student_params": n_params})
    finally:
        task.detach()
    conf = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "device")}
    return FinetuneResult(model=res.model, val=_strip(res.val), test=_strip(res.test) if res.test else None,
                          val_before=val_before, history=res.history, steps=res.steps, epochs=res.epochs,
                          train_seconds=res.train_seconds, selected=res.selected, resumed_from_step=res.resumed_from_step,
                          world_size=info.world, config=conf)


def _resolve_config(cfg: FinetuneConfig | None, overrides: dict[str, Any]) -> FinetuneConfig:
    """``cfg`` with the keyword overrides applied, one epoch when no budget is given, checked."""
    cfg = cfg or FinetuneConfig()
    if overrides:
        cfg = FinetuneConfig(**{**asdict(cfg), **overrides})
    if all(getattr(cfg, k) is None for k in ("epochs", "steps", "minutes")):
        cfg.epochs = 1.0
    cfg.check()
    return cfg


def _place(par: Replicated | FullySharded, teacher: nn.Module, student: nn.Module, adapter: ModelAdapter,
           cfg: FinetuneConfig) -> tuple[nn.Module, nn.Module]:
    """Teacher and student on the run's device: whole (the teacher's forward runs under no_grad, its
    weights untouched), or sharded across the ranks (FSDP: both sharded in place, the full models never
    on the device)."""
    if isinstance(par, FullySharded):
        _prepare_student(student, adapter, cfg, None)
        return par.shard_teacher(teacher), par.shard_student(student)
    _prepare_student(student, adapter, cfg, par.info)
    return teacher.to(par.info.device).eval(), student


def _prepare_student(student: nn.Module, adapter: ModelAdapter, cfg: FinetuneConfig, info: DistInfo | None) -> None:
    """On the run's device (``info`` None: where it is), trainable (only the last units and the head
    with ``train_last``)."""
    if info is not None:
        student.to(info.device)
    if not any(p.requires_grad for p in student.parameters()):  # e.g. copied from a frozen model
        student.requires_grad_(True)
    if cfg.train_last is not None:
        train_only_last(student, adapter, cfg.train_last)


def _objective(modality: str, teacher: nn.Module, adapter: ModelAdapter, cfg: FinetuneConfig) -> KDObjective:
    """The KD objective of the data's modality: next-token, sentence-embedding or image logits."""
    if modality == "tokens":
        return LMKDObjective(teacher, adapter, cfg)
    if modality == "sentences":
        return EncoderKDObjective(teacher, adapter, cfg)
    return ImageKDObjective(teacher, adapter, cfg)


def _strip(m: dict[str, float] | None) -> dict[str, float]:
    return {k: v for k, v in (m or {}).items() if k != "score"}


@torch.no_grad()
def _check_outputs(student: nn.Module, teacher: nn.Module, data: Any, info: DistInfo) -> int:
    x, _ = data.val[0] if len(data.val) else data.train[0]
    x = x.unsqueeze(0).to(info.device)
    was_s = student.training
    student.eval()
    try:
        so, to = student(x), teacher(x)
    except RuntimeError as e:
        raise UserError(f"the model does not accept {data.name} images {tuple(x.shape[1:])} "
                        f"({str(e).splitlines()[0][:160]})") from None
    finally:
        student.train(was_s)
    if so.shape != to.shape:
        raise UserError(f"student outputs {tuple(so.shape)} but teacher outputs {tuple(to.shape)}: "
                        "is --teacher the model this one was pruned from?")
    # a teacher whose outputs ignore the input has nothing to teach: its outputs on the image above, the image
    # mirrored and seeded noise must differ (no further reads, so the training stream and the val reads stay as
    # they were)
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([x, x.flip(-1), torch.randn(x.shape, generator=g).to(x)])
    check_not_degenerate(teacher(xs))
    return int(so.shape[-1])


def _image_target(cfg: FinetuneConfig, n_outputs: int, data: Any) -> None:
    """Labels when they are the model's classes, else label-free pure KD (one line says so)."""
    meta = getattr(data, "meta", {}) or {}
    target, why = choose_target(n_outputs, data.num_classes, class_mapped="class_map" in meta,
                                named_classes=not str(data.name).startswith("imagefolder"))
    if cfg.target == "labels" or (cfg.target == "auto" and target == "labels"):
        if n_outputs != data.num_classes and not ("class_map" in meta and data.num_classes <= n_outputs):
            raise UserError(f"the model has {n_outputs} outputs but {data.name} has {data.num_classes} classes")
        cfg.target = "labels"
        return
    if cfg.alpha < 1 and cfg.alpha_given:
        raise UserError(f"{why}: the labels cannot be used, so KD is pure distillation; drop --alpha {cfg.alpha} "
                        "(or give --alpha 1), or map the folders to the model's classes with --class-map FILE.json")
    cfg.target, cfg.alpha = "teacher", 1.0
    print(f"label-free: {why}, so the fine-tune distils the original model's outputs alone (alpha 1) and "
          "reports top-1 agreement with it; give --class-map FILE.json to use the labels", file=sys.stderr)
