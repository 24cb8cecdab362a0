"""``sglp-edge finetune``: brief KD recovery of a pruned model from its original.

Scale out with torchrun (DistributedDataParallel; gloo on CPU, nccl on GPU)::

    torchrun --nproc_per_node=2 -m sglp_edge.cli finetune PRUNED --teacher default --data fashion-mnist --epochs 1 --out DIR

Decoder language models run fully sharded under torchrun (FSDP2: student, gradients, optimiser state
and teacher split across the ranks; ``--shard auto|ddp|fsdp``)::

    torchrun --nproc_per_node=8 -m sglp_edge.cli finetune PRUNED --teacher ORIGINAL --data text --shard fsdp --steps 500 --out DIR
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import typer

from benchmarks.board.atomic import atomic_dir
from benchmarks.board.errors import UserError
from sglp_edge.commands._common import guard_out_dir, hold_out, positive, trust_builder_option, trust_remote_code_option, user_errors
from sglp_edge.commands.train import reproduce_command
from sglp_edge.train.interrupted import Interrupted
from sglp_edge.validate import check_threads


def resolve_model_dir(src: str) -> str:
    """A prune output folder holds the checkpoint in ``model/``: accept either."""
    p = Path(src)
    if p.is_dir() and not (p / "sglp_model.json").is_file() and not (p / "config.json").is_file() \
            and (p / "model").is_dir():
        return str(p / "model")
    return src


def feature_map_for(pruned: Any, teacher: Any) -> dict[str, str]:
    """Student unit path -> teacher unit path for the units the pruned model kept."""
    from sglp_edge.train.kd import kept_unit_map  # heavy: torch

    if pruned.adapter.modality == "tokens":
        kept = getattr(pruned.model.config, "sglp_kept_layers", None)
        if not kept:
            raise UserError(f"{pruned.source} does not record which decoder layers it kept (config.sglp_kept_layers); "
                            "feature KD needs it - drop --feature-weight")
        return {f"model.layers.{i}": f"model.layers.{k}" for i, k in enumerate(kept)}
    rounds = (pruned.meta or {}).get("removal_rounds") or [pruned.removed_units]
    prior = (teacher.meta or {}).get("removal_rounds") or []
    if prior:  # the teacher is itself pruned: its rounds must be a prefix of the student's
        if rounds[: len(prior)] != prior:
            raise UserError(f"{pruned.source} was not pruned from {teacher.source}; feature KD cannot match units")
        rounds = rounds[len(prior):]
    return kept_unit_map(teacher.model, teacher.adapter, rounds)


def _student_units(student: Any, teacher: str) -> Optional[str]:
    """The layer units a pruned checkpoint was declared with (``--units`` at prune time), for a
    --teacher given as file.py:fn / .pt2 / an architecture name without its own --units."""
    spec = (student.meta or {}).get("spec") or {}
    if spec.get("family") != "generic" or Path(teacher).is_dir():
        return None
    return spec.get("units")


def _check_kd(threads: Optional[int], temperature: float, alpha: Optional[float], warmup: float,
              feature_weight: float) -> None:
    """The fine-tune's numbers, before either model is loaded (FinetuneConfig.check says the same later)."""
    check_threads("--threads", threads)
    if not temperature > 0:
        raise UserError(f"--temperature (KD) must be > 0, got {temperature}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise UserError(f"--alpha (KD weight) must be in [0, 1], got {alpha}")
    if not 0 <= warmup < 1:
        raise UserError(f"--warmup is a fraction of the budget in [0, 1), got {warmup}")
    if feature_weight < 0:
        raise UserError(f"--feature-weight must be >= 0, got {feature_weight}")


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @user_errors
    def finetune_cmd(
        pruned: str = typer.Argument(..., help="the pruned model (checkpoint folder, or a `sglp-edge prune` output folder)"),
        teacher: str = typer.Option(..., "--teacher", help="the original model it was pruned from (folder, 'default', "
                                    "torchvision:<arch>, file.py:fn, model.pt2, ...)"),
        units: Optional[str] = typer.Option(None, "--units", help="--teacher's layer units by module path globs, as given "
                                            "to prune (default: read from the pruned checkpoint)"),
        weights: Optional[Path] = typer.Option(None, "--weights", help="state dict for a --teacher given by architecture name"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes", help="classes of a --teacher given by architecture name"),
        data: str = typer.Option("fashion-mnist", "--data", help="fashion-mnist | mnist5k | cifar10 | cifar100 | imagefolder:PATH | "
                                 "text. An image folder whose class count differs from the model's outputs (and no "
                                 "--class-map) is used without labels: pure KD from --teacher, scored by top-1 agreement"),
        class_map: Optional[Path] = typer.Option(None, "--class-map", help="JSON {folder name: class index}: use an image "
                                                 "folder's labels as the model's classes"),
        out: Path = typer.Option(..., "--out", help="folder to write the fine-tuned model to"),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="budget in epochs (fractions allowed)"),
        steps: Optional[int] = typer.Option(None, "--steps", help="budget in optimiser steps"),
        minutes: Optional[float] = typer.Option(None, "--minutes", help="budget in minutes of training"),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="where the data set lives"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="global batch (default 128 images / 4 blocks)"),
        lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default 0.01 SGD for images, 3e-4 AdamW for LMs)"),
        optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd | adamw"),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="default 5e-4 for images, 0 for LMs"),
        warmup: float = typer.Option(0.05, "--warmup", help="fraction of the budget spent warming up (then cosine)"),
        temperature: float = typer.Option(4.0, "--temperature", "-T", help="KD temperature"),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="weight of the KD term (1-alpha on cross-entropy); "
                                              "default 0.9 with labels, 1 (pure KD) label-free"),
        feature_weight: float = typer.Option(0.0, "--feature-weight", help="weight of feature KD (MSE on kept units); 0 = off"),
        train_last: Optional[int] = typer.Option(None, "--train-last", help="partial fine-tune (Lu et al. 2024): train only "
                                                 "the last N units and the head (LM head + final norm), freeze the rest"),
        block_size: int = typer.Option(256, "--block-size", help="LMs: tokens per packed block"),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="LMs: cap the tokens per text split"),
        val_samples: Optional[int] = typer.Option(None, "--val-samples",
                                                  help="select on the first N validation images/blocks only (quicker)"),
        test_samples: Optional[int] = typer.Option(None, "--test-samples",
                                                   help="score the result on the first N held-out images/blocks only"),
        seed: int = typer.Option(0, "--seed"),
        shard: str = typer.Option("auto", "--shard", help="under torchrun: fsdp shards the student, its gradients and "
                                  "optimiser state and the teacher across the ranks (decoder LMs); ddp keeps all of "
                                  "it on every rank; auto: fsdp for decoder LMs, ddp otherwise"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per process"),
        state: Optional[Path] = typer.Option(None, "--state", help="resume-state file (default OUT.state.pt)"),
        no_progress: bool = typer.Option(False, "--no-progress"),
        force: bool = typer.Option(False, "--force", help="replace an --out folder an earlier sglp-edge command wrote"),
        trust_builder: bool = trust_builder_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Fine-tune PRUNED with knowledge distillation from --teacher; resumable (re-run after a kill)."""
        _check_options(epochs=epochs, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, threads=threads,
                       val_samples=val_samples, test_samples=test_samples, block_size=block_size, train_last=train_last,
                       max_tokens=max_tokens, weight_decay=weight_decay, temperature=temperature, alpha=alpha,
                       warmup=warmup, feature_weight=feature_weight, optimizer=optimizer, shard=shard)
        is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
        if is_main:
            guard_out_dir(out, force=force, inputs=(pruned, teacher, data_root, data, state))
            hold_out(out, force=force, inputs=(pruned, teacher, data_root, data, state))
        if threads:
            import torch  # heavy: torch; the CLI starts without it

            torch.set_num_threads(threads)
        student, orig = _load_pair(pruned, teacher, units=units, weights=weights, num_classes=num_classes,
                                   trust={"trust_builder": trust_builder, "trust_remote_code": trust_remote_code})
        lm = student.adapter.modality == "tokens"
        bundle = _data_bundle(student, orig, pruned, teacher, data=data, data_root=data_root, seed=seed,
                              block_size=block_size, max_tokens=max_tokens, class_map=class_map)
        cfg = _finetune_config(
            lm, epochs=epochs, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, optimizer=optimizer,
            weight_decay=weight_decay, warmup=warmup, temperature=temperature, alpha=alpha,
            feature_weight=feature_weight, feature_map=feature_map_for(student, orig) if feature_weight > 0 else None,
            seed=seed, train_last=train_last, threads=threads, val_samples=val_samples, test_samples=test_samples,
            shard=shard, state_path=str(state or out.with_name(out.name + ".state.pt")), progress=not no_progress)
        res = _run_finetune(student, orig, bundle, cfg, is_main)
        if not is_main:  # under torchrun only rank 0 writes
            return
        summary = {"finetuned_from": str(pruned), "teacher": str(teacher), "data": bundle.describe(),
                   **res.summary(), "reproduce": reproduce_command("finetune", [pruned], {
                       "--teacher": teacher, "--units": units, "--weights": weights, "--num-classes": num_classes,
                       "--data": data, "--class-map": class_map, "--data-root": data_root, "--epochs": epochs,
                       "--steps": steps, "--minutes": minutes, "--batch-size": cfg.batch_size, "--lr": cfg.lr,
                       "--optimizer": cfg.optimizer, "--weight-decay": cfg.weight_decay, "--warmup": warmup,
                       "--temperature": temperature, "--alpha": alpha, "--feature-weight": feature_weight or None,
                       "--block-size": block_size if lm else None, "--max-tokens": max_tokens, "--val-samples": val_samples,
                       "--test-samples": test_samples, "--seed": seed, "--shard": None if shard == "auto" else shard,
                       "--out": out})}
        _write_finetuned(res, student, orig, out, summary, lm)
        Path(cfg.state_path).unlink(missing_ok=True)
        typer.echo(_result_line(res, cfg, lm, out))


# ---------------------------------------------------------------------------------------------
# the command's steps
# ---------------------------------------------------------------------------------------------
def _check_options(*, epochs: Optional[float], steps: Optional[int], minutes: Optional[float], batch_size: Optional[int],
                   lr: Optional[float], threads: Optional[int], val_samples: Optional[int], test_samples: Optional[int],
                   block_size: int, train_last: Optional[int], max_tokens: Optional[int], weight_decay: Optional[float],
                   temperature: float, alpha: Optional[float], warmup: float, feature_weight: float,
                   optimizer: Optional[str], shard: str = "auto") -> None:
    """Every number and choice, before the models are loaded."""
    if epochs is None and steps is None and minutes is None:
        raise UserError("give a training budget: --epochs N, --steps N or --minutes N")
    for name, v, zero_ok in (("--epochs", epochs, False), ("--steps", steps, False), ("--minutes", minutes, False),
                             ("--batch-size", batch_size, False), ("--lr", lr, False), ("--threads", threads, True),
                             ("--val-samples", val_samples, False), ("--test-samples", test_samples, False),
                             ("--block-size", block_size, False), ("--train-last", train_last, False),
                             ("--max-tokens", max_tokens, False), ("--weight-decay", weight_decay, True)):
        positive(name, v, zero_ok=zero_ok)
    _check_kd(threads, temperature, alpha, warmup, feature_weight)
    if optimizer is not None and optimizer not in ("sgd", "adamw"):
        raise UserError(f"--optimizer must be sgd or adamw, got {optimizer!r}")
    if shard not in ("auto", "ddp", "fsdp"):
        raise UserError(f"--shard must be auto, ddp or fsdp, got {shard!r}")


def _load_pair(pruned: str, teacher: str, *, units: Optional[str], weights: Optional[Path],
               num_classes: Optional[int], trust: dict[str, bool]) -> tuple[Any, Any]:
    """(student, teacher) loaded models, of one family; ``trust`` applies to both."""
    from sglp_edge.models.registry import load_model  # heavy: torch

    student = load_model(resolve_model_dir(pruned), **trust)
    orig = load_model(resolve_model_dir(teacher), units=units or _student_units(student, teacher),
                      weights=weights, num_classes=num_classes, **trust)
    if student.adapter.family != orig.adapter.family:
        raise UserError(f"{pruned} is a {student.adapter.family} model but --teacher {teacher} is {orig.adapter.family}")
    return student, orig


def _data_bundle(student: Any, orig: Any, pruned: str, teacher: str, *, data: str, data_root: Optional[Path],
                 seed: int, block_size: int, max_tokens: Optional[int], class_map: Optional[Path]) -> Any:
    """The data set to fine-tune on: text blocks for a language model, images at the model's input size otherwise."""
    from sglp_edge.data.datasets import get_dataset  # heavy: torch

    lm = student.adapter.modality == "tokens"
    if lm != (data == "text"):
        raise UserError("language models fine-tune on --data text; image models on an image data set")
    if lm:
        tok = student.tokenizer or orig.tokenizer
        if tok is None:
            raise UserError(f"neither {pruned} nor {teacher} has a tokenizer; save the tokenizer with the model")
        return get_dataset("text", data_root, seed=seed, tokenizer=tok, block_size=block_size, max_tokens=max_tokens)
    from sglp_edge.pipeline.calibration import fixed_input_size, input_channels  # heavy: torch

    return get_dataset(data, data_root, seed=seed, resize=fixed_input_size(student.model),
                       channels=input_channels(student.model), class_map=class_map)


def _finetune_config(lm: bool, *, epochs: Optional[float], steps: Optional[int], minutes: Optional[float],
                     batch_size: Optional[int], lr: Optional[float], optimizer: Optional[str],
                     weight_decay: Optional[float], warmup: float, temperature: float, alpha: Optional[float],
                     feature_weight: float, feature_map: Optional[dict[str, str]], seed: int, train_last: Optional[int],
                     threads: Optional[int], val_samples: Optional[int], test_samples: Optional[int], state_path: str,
                     progress: bool, shard: str = "auto") -> Any:
    """The FinetuneConfig of the options, the unset ones from the images' or the causal-LM task's defaults."""
    from sglp_edge.train.finetune import FinetuneConfig  # heavy: torch

    if lm:  # the causal-LM task's defaults, the ones `sglp-edge run` and benchmarks/experiments/recovery.py use
        from sglp_edge.tasks.causal_lm import CausalLM  # heavy: numpy, pydantic and the LM routes; the CLI starts without them

        dflt = CausalLM.defaults["finetune"]
    else:
        dflt = {"batch_size": 128, "lr": 0.01, "optimizer": "sgd", "weight_decay": 5e-4}
    cfg = FinetuneConfig(
        epochs=epochs, steps=steps, minutes=minutes, batch_size=batch_size or dflt["batch_size"],
        lr=lr if lr is not None else dflt["lr"], optimizer=optimizer or dflt["optimizer"],
        weight_decay=weight_decay if weight_decay is not None else dflt["weight_decay"], warmup=warmup,
        temperature=temperature, alpha=0.9 if alpha is None else alpha, alpha_given=alpha is not None,
        feature_weight=feature_weight, feature_map=feature_map, seed=seed,
        train_last=train_last,
        threads=threads, val_samples=val_samples, test_samples=test_samples, state_path=state_path,
        progress=progress, shard=shard)
    cfg.check()
    return cfg


def _run_finetune(student: Any, orig: Any, bundle: Any, cfg: Any, is_main: bool) -> Any:
    """The fine-tune (exit 130 when interrupted); the torchrun process group is left when it ends."""
    import torch.distributed as dist  # heavy: torch

    from sglp_edge.train.finetune import finetune  # heavy: torch

    try:
        return finetune(student.model, orig.model, student.adapter, bundle, cfg)
    except Interrupted as e:
        if is_main:
            typer.echo(f"interrupted: {e}", err=True)
        raise typer.Exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _write_finetuned(res: Any, student: Any, orig: Any, out: Path, summary: dict[str, Any], lm: bool) -> None:
    """--out: a Hugging Face folder for a language model, else a checkpoint folder with finetune.json."""
    if lm:
        from sglp_edge.models.hf_llm import save_hf  # heavy: torch

        save_hf(res.model, out, tokenizer=student.tokenizer or orig.tokenizer, extra={"finetune": summary})
        return
    from sglp_edge.models.registry import save_checkpoint  # heavy: torch

    meta = student.meta or {}
    with atomic_dir(out) as tmp:
        inner = save_checkpoint(res.model, student.adapter, tmp / "ckpt",
                                spec=meta.get("spec") or student.adapter.spec(student.model),
                                removed_units=meta.get("removal_rounds") or student.removed_units,
                                extra={"finetune": {k: v for k, v in summary.items() if k != "history"}})
        for f in inner.iterdir():
            shutil.move(str(f), tmp / f.name)
        inner.rmdir()
        (tmp / "finetune.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _result_line(res: Any, cfg: Any, lm: bool, out: Path) -> str:
    key = "ppl" if lm else ("agreement" if cfg.target == "teacher" else "acc")
    fmt = (lambda v: f"{v:.3f}") if lm else (lambda v: f"{v:.2%}")
    before = f"{fmt(res.val_before[key])} -> " if res.val_before else ""
    test = fmt(res.test[key]) if res.test else "n/a"
    return (f"wrote {out}: val {key} {before}{fmt(res.val[key])}, held-out test {key} {test} "
            f"({res.steps} steps, {res.train_seconds / 60:.1f} min, {res.selected}, {res.world_size} process(es))")
