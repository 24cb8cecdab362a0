"""``sglp-edge run``: the whole pipeline for one or more device profiles, resumable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import UserError
from sglp_edge.commands._common import check_space, guard_out_dir, trust_builder_option, trust_remote_code_option, user_errors
from sglp_edge.pipeline.stages import OWN
from sglp_edge.report.assemble import NEEDS_BOARD
from sglp_edge.validate import check_host, check_threads


def _resolve_config(config: Path) -> Path:
    """A config path, or the name of one shipped with the package (``--config default``)."""
    if config.is_file() or config.suffix or len(config.parts) > 1:
        return config
    shipped = Path(__file__).resolve().parents[1] / "assets" / "configs" / f"{config}.yaml"
    return shipped if shipped.is_file() else config


def _overrides(device: Optional[List[str]], latency_budget: Optional[float], latency_margin: Optional[float],
               trust_builder: bool, trust_remote_code: bool, decode_budget: Optional[float] = None,
               ttft_budget: Optional[float] = None, decode_precisions: Optional[str] = None) -> dict[str, Any]:
    """The command line's settings as config overrides (dotted keys)."""
    overrides: dict[str, Any] = {"devices": list(device)} if device else {}
    for key, v in (("latency_budget_ms", latency_budget), ("decode_budget_tps", decode_budget),
                   ("ttft_budget_ms", ttft_budget)):
        if v is not None:
            overrides.update({"prune.keep": "auto", "prune.target_macs": None, f"prune.{key}": v})
    if decode_precisions is not None:
        overrides["prune.decode_precisions"] = [p.strip() for p in decode_precisions.split(",") if p.strip()]
    if latency_margin is not None:
        overrides["prune.latency_margin"] = latency_margin
    overrides.update({k: True for k, v in (("trust_builder", trust_builder),
                                           ("trust_remote_code", trust_remote_code)) if v})  # or in the YAML
    return overrides


def _apply_board_flags(cfg: Any, host: Optional[str], emulate: bool) -> None:
    """``--host`` / ``--emulate`` on every device of the config, checked before any heavy work."""
    from sglp_edge.profiles.load import load_profile  # heavy: pydantic and yaml (the CLI starts without them)

    if host and emulate:
        raise UserError("--host and --emulate contradict each other: the emulated board runs here")
    if host or emulate:
        extra = {"host": host} if host else {"emulate": "qemu-aarch64"}
        cfg.devices = [b.model_copy(update=extra) for b in cfg.boards()]
    if emulate:  # cheap checks before any heavy work
        for b in cfg.boards():
            prof = load_profile(b.device)
            if prof.arch != "aarch64" or not get_backend(prof.backend).emulatable:
                raise UserError(f"--emulate runs aarch64 boards on ONNX Runtime, OpenVINO or onnxruntime-genai; "
                                f"{prof.name} is {prof.arch} / {prof.backend} (pick an ARM profile with --device)")


def _verdict(rep: dict[str, Any], config: Path, run_dir: Path, exit_finish_on_board: int) -> None:
    """The summary, the report's paths and the verdict; exit 1 when a constraint failed, and
    ``exit_finish_on_board`` when a device's artifact must be built on its board."""
    from sglp_edge.report.render import print_summary  # heavy: rich (the CLI starts without it)

    print_summary(rep)
    typer.echo(f"report: {run_dir / 'report.html'} (and report.json); stages run: {', '.join(rep['stages']['ran']) or 'none'}"
               f"; skipped: {', '.join(rep['stages']['skipped']) or 'none'}; {rep['wall_s']:.0f} s")
    if rep["passed"] is False:
        typer.echo("verdict: at least one constraint is NOT met (see the table above)", err=True)
        sys.exit(1)
    boards = [t for t in rep["targets"] if t.get("needs_board")]
    if boards:
        devs = " ".join(f"--device {t['device']}" for t in boards)
        typer.echo(f"verdict: {NEEDS_BOARD} for {', '.join(t['device'] for t in boards)}: the ONNX, the "
                   f"operator-support report, the trtexec command and the board bundle are in {run_dir}. "
                   "Finish on the board with:", err=True)
        typer.echo(f"  sglp-edge run --config {config} {devs} --out {run_dir} --host USER@BOARD")
        sys.exit(exit_finish_on_board)
    emu = [t["device"] for t in rep["targets"] if (t.get("target") or {}).get("emulated")]
    note = f" (latency on {', '.join(emu)} is emulated: not held)" if emu else ""
    typer.echo(f"verdict: every measured constraint is met{note}")


def register(app: typer.Typer) -> None:
    @app.command("run")
    @user_errors
    def run(
        config: Path = typer.Option(..., "--config", "-c", help="run YAML, or the name of a shipped one (default)"),
        out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: runs/<name>)"),
        device: Optional[List[str]] = typer.Option(None, "--device", help="device profile(s); replaces the config's list"),
        force: bool = typer.Option(False, "--force", help="re-run every stage even when finished earlier"),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads on the host (0 = default)"),
        host: Optional[str] = typer.Option(None, "--host", help="user@board: benchmark every device on this board over SSH"),
        emulate: bool = typer.Option(False, "--emulate", help="benchmark ARM devices on the emulated ARM board "
                                     "(aarch64 runtime under qemu-aarch64): accuracy and parity on the ARM build; "
                                     "latency recorded as emulated, never held"),
        latency_budget: Optional[float] = typer.Option(None, "--latency-budget", help="p90 latency budget in ms on the "
                                                       "first device: sets prune.keep auto (the fewest removals meeting it)"),
        decode_budget: Optional[float] = typer.Option(None, "--decode-budget", help="causal LMs: decode tokens/s to "
                                                      "reach on the first device: sets prune.keep auto (the most "
                                                      "layers predicted to meet it)"),
        ttft_budget: Optional[float] = typer.Option(None, "--ttft-budget", help="causal LMs: time to first token in "
                                                    "ms on the first device (eval.prompt_tokens prompt): sets "
                                                    "prune.keep auto"),
        decode_precisions: Optional[str] = typer.Option(None, "--decode-precisions", help="causal LMs: the "
                                                        "precisions a decode budget searches with the layers, e.g. "
                                                        "fp32,int8 (default: the profile's and every lower one)"),
        latency_margin: Optional[float] = typer.Option(None, "--latency-margin", help="fraction of the budget kept in "
                                                       "reserve for the prediction (default 0.05)"),
        trust_builder: bool = trust_builder_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """prune -> fine-tune -> export -> compile -> benchmark -> report. Exit code 1 when a
        device's constraint fails; 3 when a device's artifact must be built on its board and no --host
        was given (everything the host can do is in the run folder; the printed command finishes it).
        A re-run skips finished stages and a killed run resumes."""
        # heavy: the config schema (pydantic, yaml) and the pipeline (numpy); the CLI starts without them
        from sglp_edge.pipeline.config import load_config
        from sglp_edge.pipeline.run import EXIT_FINISH_ON_BOARD, Pipeline

        check_threads("--threads", threads)
        check_host("--host", host)
        config = _resolve_config(config)
        overrides = _overrides(device, latency_budget, latency_margin, trust_builder, trust_remote_code,
                               decode_budget, ttft_budget, decode_precisions)
        cfg = load_config(config, overrides or None)
        _apply_board_flags(cfg, host, emulate)
        import torch  # heavy

        if threads or cfg.threads:
            torch.set_num_threads(threads or cfg.threads)
        run_dir = out or Path("runs") / cfg.name
        # a run folder of ours (the marker AND its manifest) is resumed in place; anything else that is not empty
        # is the user's and stays untouched (stages replace only their own sub-folders, so inputs kept in the
        # run folder are safe); the StageRunner takes the folder's lock and checks again under it
        guard_out_dir(run_dir, reuse=True, **OWN)
        check_space(run_dir, (cfg.model,), factor=4 + 2 * len(cfg.boards()))  # models, ONNX and artifacts per device
        rep = Pipeline(cfg, run_dir, force=force, log=lambda m: typer.echo(m, err=True)).run()
        _verdict(rep, config, run_dir, EXIT_FINISH_ON_BOARD)
