"""``sglp-edge deploy RUN_DIR --device NAME --host user@board --to PATH``: install on the board the
artifact that passed that device's constraints (hash-verified, atomic, previous version kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sglp_edge.commands._common import user_errors
from sglp_edge.profiles.load import load_profile
from sglp_edge.validate import check_host


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    @user_errors
    def deploy_cmd(
        run_dir: Path = typer.Argument(..., help="folder of a finished `sglp-edge run`"),
        device: str = typer.Option(..., "--device", "-d", help="device profile whose artifact to deploy"),
        host: str = typer.Option(..., "--host", help="user@board"),
        to: str = typer.Option(..., "--to", help="folder on the board (releases/, current -> the live one)"),
        force: bool = typer.Option(False, "--force", help="deploy even if a constraint failed or was not measured"),
        rollback: bool = typer.Option(False, "--rollback", help="switch back to the previous release and exit"),
        port: Optional[int] = typer.Option(None, "--port", help="SSH port (default: profile's, else 22)"),
        identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="SSH private key"),
        known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts to verify the board"),
        accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key",
                                                 help="trust a board's key on first contact (StrictHostKeyChecking=accept-new)"),
        ssh_config: Optional[Path] = typer.Option(None, "--ssh-config", help="ssh -F config file"),
        remote_python: Optional[str] = typer.Option(None, "--remote-python", help="python on the board"),
        no_check: bool = typer.Option(False, "--no-check", help="do not run the release's runner on the board before switching to it"),
    ) -> None:
        """Install the run's pruned artifact for DEVICE on the board: verified, atomic, with rollback."""
        # heavy: numpy (benchmarks.board.runners, imported by both); `sglp-edge --help` stays fast
        from sglp_edge.targets.deploy import board_dir, deploy, pick_release, rollback as do_rollback
        from sglp_edge.targets.ssh import SSHBoardTarget

        check_host("--host", host)
        to = board_dir(to)
        prof = load_profile(device)
        rel = None if rollback else pick_release(run_dir, prof.name, force=force)
        tg = SSHBoardTarget.from_profile(prof, host, port=port, identity=identity, known_hosts=known_hosts,
                                         accept_new=accept_new_host_key, ssh_config=ssh_config,
                                         remote_python=remote_python).ssh
        if rollback:
            now = do_rollback(tg, to, check=not no_check)
            typer.echo(f"rolled back {tg.where}:{to}/current -> {now}")
            return
        if rel.verdict != "passed every constraint":
            typer.echo(f"warning: deploying with --force: {rel.verdict}", err=True)
        res = deploy(rel, tg, to, check=not no_check)
        typer.echo(f"deployed {rel.artifact} ({rel.verdict}) to {tg.where}:{res['path']} as release {res['release']}")
        if "runner" in res:
            r = res["runner"]
            typer.echo(f"runner on the board: {r['runtime']} {r['version']} on {r['machine']}, output {r['output_shape']}, "
                       f"top-1 {r['top1']}")
