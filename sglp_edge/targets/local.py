"""This machine: the board harness in a child process (its peak memory is the benchmark's own)."""

from __future__ import annotations

import platform
from typing import Any, Optional

from sglp_edge.targets.base import BenchJob, Target
from sglp_edge.targets.board_run import run_local


class LocalTarget(Target):
    kind = "local"

    def __init__(self, label: str = "", python: Optional[str] = None, env: Optional[dict[str, str]] = None) -> None:
        super().__init__(label)
        self.python, self.env = python, env

    def bench(self, job: BenchJob) -> Any:
        out = job.out_dir.resolve()
        args = job.profile.run_bench_args(artifact=str(job.artifact.resolve()), out=str(out / "result.json"),
                                          data=str(job.data.resolve()) if job.data else None,
                                          overrides=self.overrides(job))
        timeout = job.timeout_s or (job.profile.ssh.timeout_s if job.profile.ssh else 1800.0)
        run = run_local(args, out, label=job.label or self.label, timeout_s=timeout, python=self.python,
                        on_progress=job.on_progress, env=self.env)
        return self._stamp(run, self.stamp_extra())

    def overrides(self, job: BenchJob) -> dict[str, Any]:
        return dict(job.overrides)

    def stamp_extra(self) -> dict[str, Any]:
        return {"machine": platform.machine()}
