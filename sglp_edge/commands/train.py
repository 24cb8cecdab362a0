"""``sglp-edge train``: supervised training of a baseline image classifier (this is how the
shipped default model, ``sglp_edge/assets/resnet56_fmnist``, was made - see its manifest.json)."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import typer

from benchmarks.board.atomic import atomic_dir, atomic_write_json, sha256_file
from benchmarks.board.errors import UserError
from sglp_edge.commands._common import guard_out_dir, hold_out, positive, trust_builder_option, trust_remote_code_option, user_errors
from sglp_edge.train.interrupted import Interrupted
from sglp_edge.validate import check_threads


def reproduce_command(command: str, args: list[Any], options: dict[str, Any]) -> str:
    """``sglp-edge COMMAND ARGS --opt value ...`` for the options that are set (None / False
    are left out; True is a bare flag)."""
    argv = [command, *map(str, args)]
    for flag, v in options.items():
        if v is None or v is False:
            continue
        argv += [flag] if v is True else [flag, str(v)]
    return "sglp-edge " + " ".join(shlex.quote(a) for a in argv)


def write_trained_checkpoint(model: Any, adapter: Any, out: Path, manifest: dict[str, Any]) -> Path:
    """Checkpoint folder (model.safetensors + sglp_model.json + manifest.json with the weights'
    sha256), written atomically: the folder appears complete or not at all."""
    from sglp_edge.models.registry import save_checkpoint  # heavy: torch

    with atomic_dir(out) as tmp:
        inner = save_checkpoint(model, adapter, tmp / "ckpt", extra={"manifest": manifest})
        for f in inner.iterdir():
            shutil.move(str(f), tmp / f.name)
        inner.rmdir()
        manifest = {**manifest, "files": {"model.safetensors": {"sha256": sha256_file(tmp / "model.safetensors"),
                                                                "bytes": (tmp / "model.safetensors").stat().st_size}}}
        atomic_write_json(tmp / "manifest.json", manifest)
    return out


def register(app: typer.Typer) -> None:
    @app.command("train")
    @user_errors
    def train_cmd(
        model: str = typer.Argument(..., help="architecture to train from scratch, e.g. cifar_resnet56 or torchvision:resnet18"),
        data: str = typer.Option("fashion-mnist", "--data", help="fashion-mnist | mnist5k | cifar10 | cifar100 | imagefolder:PATH"),
        out: Path = typer.Option(..., "--out", help="checkpoint folder to write (model.safetensors + sglp_model.json + manifest.json)"),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="budget in epochs (fractions allowed)"),
        steps: Optional[int] = typer.Option(None, "--steps", help="budget in optimiser steps"),
        minutes: Optional[float] = typer.Option(None, "--minutes", help="budget in minutes of training"),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="where the data set lives (CIFAR: the folder holding cifar-10-batches-py)"),
        batch_size: int = typer.Option(128, "--batch-size"),
        lr: float = typer.Option(0.1, "--lr", help="peak learning rate"),
        weight_decay: float = typer.Option(5e-4, "--weight-decay"),
        warmup: float = typer.Option(0.15, "--warmup", help="fraction of the budget spent warming up (then cosine)"),
        label_smoothing: float = typer.Option(0.0, "--label-smoothing"),
        seed: int = typer.Option(0, "--seed", help="seeds the val split, the init and the data order"),
        val_size: Optional[int] = typer.Option(None, "--val-size", help="validation images carved from the training set"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is fastest on busy shared cores)"),
        state: Optional[Path] = typer.Option(None, "--state", help="resume-state file (default: OUT.state.pt next to OUT)"),
        no_progress: bool = typer.Option(False, "--no-progress"),
        force: bool = typer.Option(False, "--force", help="replace an --out folder an earlier sglp-edge command wrote"),
        trust_builder: bool = trust_builder_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Train MODEL from scratch on DATA; resumable (re-run the same command after a kill)."""
        import torch  # heavy: torch (and the modules below import it); the CLI starts without it

        from sglp_edge.data.datasets import get_dataset
        from sglp_edge.models.registry import load_model
        from sglp_edge.train.config import LoopConfig
        from sglp_edge.train.fit import BASELINE_RECIPE, train_classifier, training_manifest

        if epochs is None and steps is None and minutes is None:
            raise UserError("give a training budget: --epochs N, --steps N or --minutes N")
        if any(v is not None and v < 0 for v in (label_smoothing, weight_decay)) or not 0 <= label_smoothing < 1:
            raise UserError("--label-smoothing must be in [0, 1) and --weight-decay >= 0")
        for name, v in (("--epochs", epochs), ("--steps", steps), ("--minutes", minutes), ("--batch-size", batch_size),
                        ("--lr", lr), ("--val-size", val_size)):
            positive(name, v)
        check_threads("--threads", threads)
        guard_out_dir(out, force=force, inputs=(data_root, data, state))
        hold_out(out, force=force, inputs=(data_root, data, state))
        bundle = get_dataset(data, data_root, seed=seed, val_size=val_size)
        torch.manual_seed(seed)  # the initial weights depend on the seed only
        loaded = load_model(model, num_classes=bundle.num_classes, trust_builder=trust_builder,
                            trust_remote_code=trust_remote_code)
        if loaded.kind not in ("builtin-arch", "torchvision"):
            raise UserError(f"`train` builds an architecture from scratch; {model} is a trained checkpoint "
                            "(use `sglp-edge finetune` to keep training it)")
        recipe = {**BASELINE_RECIPE, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup}
        cfg = LoopConfig(epochs=epochs, steps=steps, minutes=minutes, seed=seed, threads=threads, **recipe)
        cfg.check()
        net = loaded.model
        state_path = state or out.with_name(out.name + ".state.pt")
        t0 = time.time()
        try:
            res = train_classifier(net, bundle, cfg, state_path=state_path, label_smoothing=label_smoothing,
                                   progress=not no_progress, desc=f"train {model}")
        except Interrupted as e:
            typer.echo(f"interrupted: {e}", err=True)
            raise typer.Exit(130)
        manifest = training_manifest(model, bundle, seed, res, t0, reproduce_command("train", [model], {
                "--data": data, "--data-root": data_root, "--epochs": epochs, "--steps": steps, "--minutes": minutes,
                "--batch-size": batch_size, "--lr": lr, "--weight-decay": weight_decay, "--warmup": warmup,
                "--label-smoothing": label_smoothing or None, "--seed": seed, "--val-size": val_size,
                "--threads": threads, "--out": out}))
        write_trained_checkpoint(res.model, loaded.adapter, out, manifest)
        state_path.unlink(missing_ok=True)
        test = "n/a" if res.test_acc is None else f"{res.test_acc:.2%}"
        typer.echo(f"wrote {out}: val top-1 {res.val_acc:.2%}, held-out test top-1 {test} ({res.fit.selected})")
