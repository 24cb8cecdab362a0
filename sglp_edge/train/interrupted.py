"""The exception a training run raises when SIGTERM / Ctrl-C stopped it after its state was saved.

Standard library only, so the CLI (:mod:`sglp_edge.commands._common`) catches it by class without
importing torch."""

from __future__ import annotations

from pathlib import Path


class Interrupted(Exception):
    """Training stopped by SIGTERM / Ctrl-C after its state was saved."""

    def __init__(self, state_path: Path | None, step: int):
        super().__init__(f"interrupted at step {step}; state saved to {state_path}; re-run the same command to resume")
        self.state_path, self.step = state_path, step
