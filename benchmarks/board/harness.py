"""Timing core of the on-device benchmark: numpy + standard library only (runs on the board).

Measurement practice (docs: docs/devices-and-constraints.md):

* warm up **by time** (``warmup_s``), not by a fixed count;
* then measure until **both** ``min_iters`` iterations and ``min_duration_s`` seconds are reached
  (optionally capped by ``max_iters`` / ``max_duration_s``);
* every iteration is timed with :func:`time.perf_counter_ns`; the caller's ``sync`` callable is
  invoked **before each clock read** (a no-op for the synchronous CPU runtimes, a stream
  synchronisation for TensorRT), so asynchronous work is never left outside the timed window;
* the raw per-iteration times are kept (in ms) so every figure can be recomputed later;
* p50/p90/p95/p99, mean, std, min, max and throughput are derived from those raw times.

Peak memory comes from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and ``VmHWM`` in
``/proc/self/status`` (the same number on Linux, both recorded). "MB" in this package means MiB
(2**20 bytes) everywhere.

The environment (CPU model, OS, Python, numpy, the runtime's version, Jetson L4T release, power
mode, clocks) is captured by :func:`capture_env`; every probe is optional and never raises.
"""

from __future__ import annotations

import glob
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.board.errors import UserError

MIB = float(1 << 20)

#: Percentiles reported for every latency distribution.
PERCENTILES = (50, 90, 95, 99)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class MeasureConfig:
    """How long to warm up and measure. Defaults follow trtexec (200 ms warm-up, >= 10
    iterations and >= 3 s)."""

    warmup_s: float = 0.2
    min_iters: int = 10
    min_duration_s: float = 3.0
    max_iters: Optional[int] = None
    max_duration_s: Optional[float] = None

    def validate(self) -> "MeasureConfig":
        if self.warmup_s < 0:
            raise UserError(f"warm-up must be >= 0 s, got {self.warmup_s}")
        if self.min_iters < 1:
            raise UserError(f"min iterations must be >= 1, got {self.min_iters}")
        if self.min_duration_s < 0:
            raise UserError(f"min duration must be >= 0 s, got {self.min_duration_s}")
        if self.max_iters is not None and self.max_iters < self.min_iters:
            raise UserError(f"max iterations ({self.max_iters}) is below min iterations ({self.min_iters})")
        if self.max_duration_s is not None and self.max_duration_s < self.min_duration_s:
            raise UserError(
                f"max duration ({self.max_duration_s} s) is below min duration ({self.min_duration_s} s)"
            )
        return self


@dataclass
class Measurement:
    """Raw result of one timed loop."""

    times_ns: list[int]
    warmup_iters: int
    warmup_s: float
    wall_s: float  # wall time of the measured loop (sum of iteration times plus loop overhead)
    batch_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def times_ms(self) -> np.ndarray:
        return np.asarray(self.times_ns, dtype=np.float64) / 1e6

    def stats(self) -> dict[str, Any]:
        return latency_stats(self.times_ms, batch_size=self.batch_size, wall_s=self.wall_s)

    def to_dict(self, keep_raw: bool = True) -> dict[str, Any]:
        d = {
            "batch_size": self.batch_size,
            "warmup_iters": self.warmup_iters,
            "warmup_s": round(self.warmup_s, 6),
            "wall_s": round(self.wall_s, 6),
            "config": self.config,
            **self.stats(),
        }
        if keep_raw:
            d["raw_ms"] = [round(float(t), 6) for t in self.times_ms]
        return d


def _noop() -> None:
    return None


def measure(
    fn: Callable[[], Any],
    config: MeasureConfig | None = None,
    *,
    sync: Callable[[], Any] | None = None,
    batch_size: int = 1,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> Measurement:
    """Time ``fn`` (one inference on already-bound inputs).

    ``sync`` is called before every clock read (GPU backends pass their stream synchronise).
    Warm-up runs ``fn`` until ``warmup_s`` has elapsed (at least once); measurement then runs
    until both ``min_iters`` and ``min_duration_s`` are satisfied, or a max cap is hit.
    """
    cfg = (config or MeasureConfig()).validate()
    sync = sync or _noop

    # Warm-up by time (at least one call, so lazy initialisation never lands in the timings).
    warm_iters = 0
    sync()
    w0 = clock()
    warm_deadline = w0 + int(cfg.warmup_s * 1e9)
    while True:
        fn()
        warm_iters += 1
        sync()
        now = clock()
        if now >= warm_deadline:
            break
    warm_s = (now - w0) / 1e9

    times: list[int] = []
    min_ns = int(cfg.min_duration_s * 1e9)
    max_ns = int(cfg.max_duration_s * 1e9) if cfg.max_duration_s is not None else None
    total = 0
    sync()
    loop0 = clock()
    while True:
        sync()
        t0 = clock()
        fn()
        sync()
        t1 = clock()
        dt = t1 - t0
        times.append(dt)
        total = t1 - loop0
        n = len(times)
        if cfg.max_iters is not None and n >= cfg.max_iters:
            break
        if max_ns is not None and total >= max_ns and n >= 1:
            break
        if n >= cfg.min_iters and total >= min_ns:
            break
    return Measurement(
        times_ns=times,
        warmup_iters=warm_iters,
        warmup_s=warm_s,
        wall_s=total / 1e9,
        batch_size=batch_size,
        config=asdict(cfg),
    )


def latency_stats(times_ms: "np.ndarray | list[float]", *, batch_size: int = 1, wall_s: float | None = None) -> dict[str, Any]:
    """p50/p90/p95/p99, mean, std (sample, ddof=1), min, max and throughput from raw times (ms).

    Throughput (items/s) = batch_size * iterations / sum(iteration times); it excludes the
    loop's own overhead. ``wall_s`` (if given) is reported too."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarise")
    total_s = float(t.sum()) / 1e3
    out: dict[str, Any] = {"iterations": int(t.size)}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = float(np.percentile(t, p))
    out.update(
        mean_ms=float(t.mean()),
        std_ms=float(t.std(ddof=1)) if t.size > 1 else 0.0,
        min_ms=float(t.min()),
        max_ms=float(t.max()),
        timed_s=total_s,
        throughput_items_per_s=(batch_size * t.size / total_s) if total_s > 0 else math.inf,
        throughput_batches_per_s=(t.size / total_s) if total_s > 0 else math.inf,
    )
    if wall_s is not None:
        out["wall_s"] = float(wall_s)
    return out


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _proc_status_mb(field_name: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    parts = line.split()
                    return float(parts[1]) / 1024.0  # kB -> MiB
    except OSError:
        return None
    return None


def peak_memory() -> dict[str, Optional[float]]:
    """Peak and current resident memory of this process in MiB.

    ``peak_rss_mb`` is ``VmHWM`` where /proc has it (Linux), else ``ru_maxrss``. Not the larger
    of the two: on Linux ``ru_maxrss`` survives fork + exec, so a benchmark started by a big
    parent (a Python process holding torch) would report the parent's peak, not its own.
    All fields are ``None`` where the platform has no such counter."""
    ru = None
    try:
        import resource  # POSIX only (see the except below)

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ru = r / MIB if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux
    except Exception:  # pragma: no cover - Windows
        ru = None
    hwm = _proc_status_mb("VmHWM")
    rss = _proc_status_mb("VmRSS")
    return {
        "peak_rss_mb": hwm if hwm is not None else ru,
        "ru_maxrss_mb": ru,
        "vmhwm_mb": hwm,
        "rss_now_mb": rss,
    }


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _read_text(path: str, limit: int = 4096) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> Optional[str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    out = (p.stdout or "") + (p.stderr or "")
    return out.strip() or None


def cpu_model() -> Optional[str]:
    """CPU model name from /proc/cpuinfo (x86 ``model name``; ARM ``Hardware``/``Model`` or the
    device-tree model), falling back to :func:`platform.processor`."""
    text = _read_text("/proc/cpuinfo", limit=1 << 20)
    if text:
        for key in ("model name", "Hardware", "Model", "cpu model", "Processor"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", text, flags=re.MULTILINE)
            if m and m.group(1).strip():
                return m.group(1).strip()
    dt = _read_text("/proc/device-tree/model")
    if dt:
        return dt
    return platform.processor() or None


def _cpu_clocks() -> dict[str, Any]:
    cur: dict[str, int] = {}
    gov: set[str] = set()
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq")):
        cpu = d.split("/")[-2]
        v = _read_text(os.path.join(d, "scaling_cur_freq"))
        if v and v.isdigit():
            cur[cpu] = int(v)
        g = _read_text(os.path.join(d, "scaling_governor"))
        if g:
            gov.add(g)
    out: dict[str, Any] = {}
    if cur:
        out["cpu_cur_khz"] = cur
    if gov:
        out["cpu_governors"] = sorted(gov)
    return out


def _jetson_env() -> dict[str, Any]:
    """L4T release, power mode (nvpmodel -q) and GPU/EMC clocks; empty off a Jetson."""
    rel = _read_text("/etc/nv_tegra_release")
    model = _read_text("/proc/device-tree/model")
    if not rel and not (model and "jetson" in model.lower()):
        return {}
    out: dict[str, Any] = {"l4t_release": rel.splitlines()[0] if rel else None, "model": model}
    nv = _run(["nvpmodel", "-q"])
    if nv:
        out["nvpmodel_q"] = nv
        m = re.search(r"NV Power Mode:\s*(.+)", nv)
        if m:
            out["power_mode"] = m.group(1).strip()
    devfreq: dict[str, Any] = {}
    for d in sorted(glob.glob("/sys/class/devfreq/*")):
        name = os.path.basename(d)
        cur = _read_text(os.path.join(d, "cur_freq"))
        if cur:
            devfreq[name] = {
                "cur_freq_hz": cur,
                "min_freq_hz": _read_text(os.path.join(d, "min_freq")),
                "max_freq_hz": _read_text(os.path.join(d, "max_freq")),
                "governor": _read_text(os.path.join(d, "governor")),
            }
    if devfreq:
        out["devfreq"] = devfreq  # the iGPU (e.g. 17000000.gpu / 17000000.ga10b) is one of these
    emc = _read_text("/sys/kernel/debug/bpmp/debug/clk/emc/rate")  # root only
    if emc:
        out["emc_rate_hz"] = emc
    return out


def capture_env(extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Everything that can change a latency figure, recorded alongside it. Never raises."""
    env: dict[str, Any] = {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        env["cpu_affinity"] = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        env["cpu_affinity"] = None
    try:
        env["loadavg"] = list(os.getloadavg())
    except (AttributeError, OSError):
        env["loadavg"] = None
    env.update(_cpu_clocks())
    env["thread_env"] = {
        k: os.environ[k]
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")
        if k in os.environ
    }
    jet = _jetson_env()
    if jet:
        env["jetson"] = jet
    if extra:
        env.update(extra)
    return env


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
