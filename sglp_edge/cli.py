"""The ``sglp-edge`` command line. Each sub-command lives in ``sglp_edge/commands/<name>.py`` and
exposes ``register(app)``; heavy imports (torch, onnx, openvino) happen inside the commands, so
``sglp-edge --help`` stays fast."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from benchmarks.board.errors import UserError

app = typer.Typer(
    name="sglp-edge",
    help="SGLP depth pruning -> KD fine-tune -> ONNX -> TensorRT/OpenVINO/ONNX Runtime -> on-device benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = ["prune", "train", "finetune", "export", "compile", "bench", "run", "deploy"]

for _name in COMMAND_MODULES:
    if importlib.util.find_spec(f"sglp_edge.commands.{_name}") is not None:
        importlib.import_module(f"sglp_edge.commands.{_name}").register(app)


def main() -> None:
    try:
        app(standalone_mode=True)
    except UserError as e:  # pragma: no cover - typer usually exits before this
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
