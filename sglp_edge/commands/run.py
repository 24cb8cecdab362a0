"""``sglp-edge run``: the whole pipeline for one or more device profiles, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import guard_out_dir, positive, user_errors


def _resolve_config(config: Path) -> Path:
    """A config path, or the name of one shipped with the package (``--config default``)."""
    if config.is_file() or config.suffix or len(config.parts) > 1:
        return config
    shipped = Path(__file__).resolve().parents[1] / "assets" / "configs" / f"{config}.yaml"
    return shipped if shipped.is_file() else config


def register(app: typer.Typer) -> None:
    @app.command("run")
    @user_errors
    def run(
        config: Path = typer.Option(..., "--config", "-c", help="run YAML, or the name of a shipped one (default)"),
        out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: runs/<name>)"),
        device: Optional[List[str]] = typer.Option(None, "--device", help="device profile(s); replaces the config's list"),
        force: bool = typer.Option(False, "--force", help="re-run every stage even when finished earlier"),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads on the host (0 = default)"),
    ) -> None:
        """prune -> fine-tune -> export -> compile -> benchmark -> report. Exit code 1 when a
        device's constraint fails; a re-run skips finished stages and a killed run resumes."""
        import sys

        import torch

        from ..pipeline import Pipeline, load_config
        from ..report import print_summary

        positive("--threads", threads, zero_ok=True)
        config = _resolve_config(config)
        overrides = {"devices": list(device)} if device else None
        cfg = load_config(config, overrides)
        if threads or cfg.threads:
            torch.set_num_threads(threads or cfg.threads)
        run_dir = out or Path("runs") / cfg.name
        # a run folder is resumed in place; anything else that is not empty is the user's and stays untouched
        # (stages replace only their own sub-folders, so inputs kept in the run folder are safe)
        if (run_dir / "manifest.json").is_file() and not (run_dir / ".sglp-edge").is_file():
            from exporters.atomic import mark_output

            mark_output(run_dir)  # a run folder written before the marker existed
        guard_out_dir(run_dir, reuse=True)
        rep = Pipeline(cfg, run_dir, force=force, log=lambda m: typer.echo(m, err=True)).run()
        print_summary(rep)
        typer.echo(f"report: {run_dir / 'report.html'} (and report.json); stages run: {', '.join(rep['stages']['ran']) or 'none'}"
                   f"; skipped: {', '.join(rep['stages']['skipped']) or 'none'}; {rep['wall_s']:.0f} s")
        if rep["passed"] is False:
            typer.echo("verdict: at least one constraint is NOT met (see the table above)", err=True)
            sys.exit(1)
        typer.echo("verdict: every measured constraint is met")
