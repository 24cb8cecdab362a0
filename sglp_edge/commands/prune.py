"""``sglp-edge prune``: SGLP (or a baseline) on a model, writing the pruned model, plan.json and
the CKA heatmap into one output folder, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from benchmarks.board.errors import UserError
from sglp_edge.commands._common import guard_out_dir, hold_out, trust_builder_option, trust_remote_code_option, user_errors


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @user_errors
    def prune(
        model: str = typer.Argument(..., help="'default' (shipped ResNet-56), 'mobilenetv2' (shipped small MobileNetV2), "
                                              "a checkpoint folder, an HF folder / .gguf / 'smollm2', "
                                              "cifar_resnet20..110, torchvision:<arch>, your own builder "
                                              "file.py:fn or a torch.export program model.pt2 (with --units)"),
        out: Path = typer.Option(..., "--out", help="output folder (written atomically)"),
        data: str = typer.Option("fashion-mnist", "--data", help="calibration data: fashion-mnist, mnist5k, cifar10, "
                                 "cifar100, imagefolder:<dir>, text. imagefolder:DIR: one sub-folder of images per "
                                 "class (or DIR/train + DIR/val, or images with no class folders: no labels); resized and center-cropped to the model's input "
                                 "size (model.image_size, else 224), ImageNet mean/std. Its labels are used only when "
                                 "its class count equals the model's outputs or --class-map is given; otherwise "
                                 "candidates are scored label-free, against the model's own outputs"),
        class_map: Optional[Path] = typer.Option(None, "--class-map", help="JSON {folder name: class index} mapping "
                                                 "imagefolder classes to the model's outputs: score with those labels"),
        allow_degenerate: bool = typer.Option(False, "--allow-degenerate", help="go on when the model's outputs do not "
                                              "depend on its input (weights not loaded?)"),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder of a local CIFAR copy"),
        keep: Optional[str] = typer.Option(None, "--keep", help="number of layer units to keep, or 'auto': the fewest "
                                           "removals meeting --device's latency budget"),
        target_macs: Optional[float] = typer.Option(None, "--target-macs", help="fraction of MACs to remove (0..1)"),
        method: str = typer.Option("sglp", "--method", help="sglp, random, drop_last, block_influence, angular, sleb"),
        heal: str = typer.Option("none", "--heal", help="training-free healing of each removed run: none | linear "
                                                        "(a least-squares map folded into the kept layer before it)"),
        k: Optional[int] = typer.Option(None, "--k", help="number of segments (default: chosen automatically)"),
        protocol: str = typer.Option("auto", "--protocol", help="candidate score in a segment: auto (loss for decoder "
                                                                     "LMs and CNNs, natural for encoders) | natural | reference "
                                                                     "(GradNorm) | loss (calibration loss) | healed "
                                                                     "(calibration loss after --heal linear)"),
        calib_batches: int = typer.Option(4, "--calib-batches", help="calibration batches for CKA"),
        grad_batches: int = typer.Option(1, "--grad-batches", help="fixed calibration batches for GradNorm"),
        batch_size: int = typer.Option(0, "--batch-size", help="calibration batch size (0 = 128 images / 8 sequences / 32 sentences)"),
        seq_len: int = typer.Option(128, "--seq-len", help="tokens per calibration sequence (LMs; the sentence length cap for encoders)"),
        exhaustive_budget: int = typer.Option(64, "--exhaustive-budget", help="max combinations scored exhaustively per segment"),
        beam_width: int = typer.Option(2, "--beam-width"),
        eval_budget: int = typer.Option(80, "--eval-budget", help="GradNorm evaluations over all segments "
                                                                  "(0 = unbounded: exhaustive/beam everywhere)"),
        k_budget: str = typer.Option("raise", "--k-budget", help="raise: raise k until every segment's exhaustive/beam "
                                     "search fits --eval-budget | search: keep the k the CKA structure supports "
                                     "(elbow) and spend --eval-budget on a budgeted search inside its segments"),
        allocation: str = typer.Option("auto", "--allocation", help="removals per segment: proportional (to removable "
                                       "units) | redundancy (where adjacent-CKA is highest) | auto (redundancy for LMs)"),
        units: Optional[str] = typer.Option(None, "--units", help="declare layer units by module path globs, e.g. 'layer1.*,layer2.*'"),
        weights: Optional[Path] = typer.Option(None, "--weights", help="state dict (.pt/.pth/.safetensors) for an architecture name"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes"),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)"),
        accelerator: str = typer.Option("auto", "--accelerator", help="where calibration, CKA and candidate scoring "
                                        "run: auto (CUDA when torch sees a GPU, else cpu) | cpu | cuda; decoder LMs "
                                        "run in bfloat16 on a GPU, CKA accumulates in float64; recorded in plan.json"),
        force: bool = typer.Option(False, "--force", help="replace an --out folder an earlier sglp-edge command wrote"),
        latency_budget: Optional[float] = typer.Option(None, "--latency-budget", help="p90 latency budget in ms on "
                                                       "--device (implies --keep auto; default with --keep auto: the "
                                                       "profile's latency_p90_ms limit)"),
        latency_margin: float = typer.Option(0.05, "--latency-margin", help="fraction of the budget kept in reserve "
                                             "for the latency model's prediction"),
        latency_rounds: int = typer.Option(3, "--latency-rounds", help="measured rounds before giving up"),
        device: str = typer.Option("local-cpu-ort", "--device", help="device profile whose latency budget --keep auto meets"),
        trust_builder: bool = trust_builder_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Prune whole layer units with SGLP (CKA -> Fisher segments -> GradNorm) or a baseline."""
        from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job  # heavy: imports torch; the CLI starts without it

        job = PruneJob(model=model, out=out, data=data, data_root=data_root, keep=_parse_keep(keep), target_macs=target_macs,
                       method=method, k=k, protocol=protocol, calib_batches=calib_batches, grad_batches=grad_batches,
                       batch_size=batch_size, seq_len=seq_len, exhaustive_budget=exhaustive_budget,
                       beam_width=beam_width, eval_budget=eval_budget, k_budget=k_budget, allocation=allocation, heal=heal, units=units, weights=weights, num_classes=num_classes, class_map=class_map,
                       allow_degenerate=allow_degenerate, seed=seed,
                       threads=threads, force=force, device=device, latency_budget_ms=latency_budget, accelerator=accelerator,
                       latency_margin=latency_margin, latency_rounds=latency_rounds,
                       trust_builder=trust_builder, trust_remote_code=trust_remote_code,
                       log=lambda m: typer.echo(m, err=True))
        job.validate()
        guard_out_dir(out, force=force, inputs=(model, weights, data_root, data))
        hold_out(out, force=force, inputs=(model, weights, data_root, data))
        result = run_prune_job(job, show_progress=True)
        _report(result.plan, out)


def _parse_keep(keep: Optional[str]) -> int | str | None:
    """--keep: a number of units, 'auto' or not given."""
    if keep is not None and keep != "auto":
        try:
            return int(keep)
        except ValueError:
            raise UserError(f"--keep is a number of units or 'auto' (got {keep!r})") from None
    return keep


def _report(p, out: Path) -> None:
    """One line on what was pruned, and one on the latency search when --keep auto ran one."""
    typer.echo(
        f"pruned {p.family}: units {p.n_units_before} -> {p.n_units_after}, params {p.params_before:,} -> "
        f"{p.params_after:,} (-{100 * p.params_reduction:.1f}%), MACs {p.macs_before:,} -> {p.macs_after:,} "
        f"(-{100 * p.macs_reduction:.1f}%), {p.evaluations} candidate evaluations"
        + (f" ({p.config.get('protocol')} score{', label-free' if p.config.get('target') == 'teacher' else ''})"
           if p.method == "sglp" else "") + f", {p.wall_s:.1f} s -> {out}"
    )
    if p.search and p.search.get("chosen"):
        c = p.search["chosen"]
        typer.echo(f"latency budget {p.search['budget_ms']:.3f} ms on {p.search['device']}: keep {c['kept']}, "
                   f"predicted p90 {c['predicted_p90_ms']:.3f} ms, measured p90 {c['measured_p90_ms']:.3f} ms, "
                   f"{p.search['rounds']} measured round(s) (search in {out / 'plan.json'})")
