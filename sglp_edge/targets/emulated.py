"""The emulated ARM board: the same board harness, run by an aarch64 Python with the ARM build of
the profile's runtime under ``qemu-aarch64-static`` (see :mod:`sglp_edge.targets.arm64_env`).

It measures what emulation can tell about a board (the artifact loads on the ARM build of its
runtime and gives the same answers: accuracy and parity); its timings and memory are the
emulator's, recorded as emulated and never held against a constraint. Latency work is cut to a
few iterations at the primary batch, since the figures are not used.
"""

from __future__ import annotations

from typing import Any, Optional

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import UserError

from sglp_edge.targets import arm64_env
from sglp_edge.targets.base import BenchJob
from sglp_edge.targets.local import LocalTarget

#: bench settings under emulation unless the caller set them: latency is not held, so measure little
EMULATED_BENCH = {"warmup_s": 0.0, "min_iters": 3, "min_duration_s": 0.0, "max_eval": 500}
EMULATED_TIMEOUT_S = 3600.0


class EmulatedArmTarget(LocalTarget):
    kind = "emulated"
    emulated = True

    def __init__(self, label: str = "", profile: Any = None, progress: Optional[Any] = None) -> None:
        super().__init__(label)
        self.profile, self.progress = profile, progress
        self.setup: dict[str, Any] = {}
        if profile is not None and profile.arch != "aarch64":
            raise UserError(f"profile {profile.name} is for {profile.arch}; --emulate runs aarch64 boards only")

    @property
    def where(self) -> str:
        return "emulated:qemu-aarch64"

    def prepare(self, backend: str) -> dict[str, Any]:
        b = get_backend(backend)
        if not b.emulatable:
            raise UserError(f"the {backend} backend has no aarch64 build that runs under emulation here; "
                            f"emulated targets run {', '.join(arm64_env.RUNTIME_DISTS.keys() - {'numpy'})}")
        # a runtime's own runtime dependencies first (onnxruntime-genai loads onnxruntime's library)
        self.setup = arm64_env.ensure((*b.runtime_deps, b.runtime_dist), progress=self.progress)
        self.python = self.setup["python"]
        return self.setup

    def bench(self, job: BenchJob) -> Any:
        if not self.setup:
            self.prepare(job.profile.backend)
        return super().bench(BenchJob(**{**job.__dict__, "timeout_s": job.timeout_s or EMULATED_TIMEOUT_S}))

    def overrides(self, job: BenchJob) -> dict[str, Any]:
        o = {k: v for k, v in job.overrides.items() if v is not None}
        for k, v in EMULATED_BENCH.items():
            o.setdefault(k, v)
        if "batch_sizes" not in o:  # the primary batch only: the timings are not used
            o["batch_sizes"] = list(job.profile.bench.batch_sizes[:1])
        return o

    def stamp_extra(self) -> dict[str, Any]:
        s = self.setup
        return {"machine": "aarch64 (emulated)", "emulator": "qemu-aarch64", "qemu_cpu": s.get("qemu_cpu"),
                "qemu": s.get("qemu"), "aarch64_versions": s.get("versions"),
                "note": "latency, memory and energy come from the emulator and are never held against a constraint"}
