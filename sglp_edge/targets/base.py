"""Where a benchmark runs: one interface, three kinds.

    target = make_target(profile, host=None, emulate=False)       # targets.factory: local | ssh | emulated
    run = target.bench(BenchJob(artifact, data, profile, out_dir))  # a board_run.BoardRun
    cons = target.constraints(profile, metrics)                    # emulated: latency never held

The pipeline and ``sglp-edge bench`` say "benchmark this artifact on that target" and know nothing
of SSH or QEMU. Every result.json a target leaves behind carries a ``target`` block (kind, where,
emulated, and for emulation the QEMU CPU and the aarch64 runtime versions), so each figure says
where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.board.atomic import atomic_write_json

from sglp_edge.profiles.schema import ConstraintResult, evaluate_constraints

#: metrics an emulator cannot measure for a real board: its timings are 100-300x a board's, its
#: memory is the emulator's, and it draws no board power
EMULATION_NOT_HELD = ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "peak_memory_mb", "energy_mj")
KINDS = ("local", "ssh", "emulated")
EMULATORS = ("qemu-aarch64",)


@dataclass
class BenchJob:
    artifact: Path
    data: Optional[Path]
    profile: Any  # profiles.DeviceProfile
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    timeout_s: Optional[float] = None
    label: str = ""
    bundle_path: Optional[Path] = None  # where an SSH target writes its upload bundle
    bundle: Any = None  # a ready bundle.Bundle to upload as is (several boards share one)
    on_progress: Optional[Callable[[str, dict[str, Any]], None]] = None


class Target:
    """A place that benchmarks artifacts. Subclasses: local, ssh, emulated."""

    kind: str = "local"
    emulated: bool = False

    def __init__(self, label: str = "") -> None:
        self.label = label

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "where": self.where, "emulated": self.emulated, "label": self.label}

    @property
    def where(self) -> str:
        return "local"

    def prepare(self, backend: str) -> dict[str, Any]:
        """Make the target able to run ``backend`` (the emulated one sets up its ARM Python here)."""
        return {}

    def bench(self, job: BenchJob) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def constraints(self, profile: Any, metrics: dict[str, Any]) -> list:
        """Constraint results for ``metrics`` measured on this target (see :func:`held_constraints`)."""
        return held_constraints(profile, metrics, self.emulated)

    def _stamp(self, run: Any, extra: Optional[dict[str, Any]] = None) -> Any:
        """Record in result.json (and the in-memory result) which target produced it."""
        info = {**self.describe(), **(extra or {})}
        for doc, name in ((run.result, "result.json"), (run.partial, "result.partial.json")):
            if doc is None:
                continue
            doc["target"] = info
            if self.emulated:
                doc.setdefault("metrics", {})
                doc["emulated_metrics"] = {k: doc["metrics"].get(k) for k in EMULATION_NOT_HELD
                                           if doc["metrics"].get(k) is not None}
            if run.out_dir is not None and (Path(run.out_dir) / name).is_file():
                atomic_write_json(Path(run.out_dir) / name, doc)
        return run


def held_constraints(profile: Any, metrics: dict[str, Any], emulated: bool) -> list:
    """Every constraint of ``profile`` against ``metrics``; on an emulated target the metrics of
    :data:`EMULATION_NOT_HELD` are reported "not measured: emulated" (passed=None), never held."""
    out = []
    for r in evaluate_constraints(profile, metrics):
        if emulated and r.metric in EMULATION_NOT_HELD:
            r = ConstraintResult(metric=r.metric, op=r.op, limit=r.limit, measured=None, passed=None,
                                 note=f"not measured: emulated (the emulator gave {r.measured:.4g}; "
                                      f"a real board is needed)" if r.measured is not None else
                                 "not measured: emulated")
        out.append(r)
    return out


