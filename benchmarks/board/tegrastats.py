"""Jetson power and energy from ``tegrastats`` (standard library only: runs on the board).

NVML power is not available on Jetson; ``tegrastats`` prints the INA3221 rails. Formats differ by
board and JetPack release, e.g. (real lines, see ``tests/data/tegrastats_real.txt``)::

    # AGX Orin, JetPack 5/6: timestamp, rails in mW as current/average
    10-26-2025 05:10:54 RAM 6879/62841MB (lfb 3x4MB) ... GR3D_FREQ 0%@[305,305] ...
        VDD_GPU_SOC 2801mW/2801mW VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 4536mW/4536mW ...
    # Xavier NX, JetPack 4: no unit suffix;  Nano, JetPack 4: POM_5V_IN
    RAM 5246/7771MB ... VDD_IN 6140/5510 VDD_CPU_GPU_CV 2706/2119 VDD_SOC 1074/1051
    RAM 1923/3964MB ... POM_5V_IN 1750/1628 POM_5V_GPU 0/0 POM_5V_CPU 366/406

Total board power: ``VDD_IN`` (Orin Nano/NX, Xavier NX, TX1/TX2) or ``POM_5V_IN`` (Nano) is the
input rail and already the total; the other rails are *subsets* and must not be added to it. The
AGX Orin has no input rail: the total is the sum of its rails (as jtop does); which rails went into
the figure is always recorded (``total_source``).

Energy per inference = mean total power during the timed window x window duration / number of
inferences (mW x s = mJ).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

_TS = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# rail: NAME current/average, optional mW unit on both; must be followed by whitespace or end,
# which keeps "RAM 6879/62841MB" and "IRAM 0/252kB" out.
_RAIL = re.compile(r"(?<![\w@])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "APE"}

#: rails that already measure the whole board input (never add sub-rails to these)
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass
class TegraSample:
    timestamp: Optional[str] = None
    ram_used_mb: Optional[int] = None
    ram_total_mb: Optional[int] = None
    swap_used_mb: Optional[int] = None
    cpu_load_pct: list[Optional[int]] = field(default_factory=list)  # None = core off
    cpu_freq_mhz: list[Optional[int]] = field(default_factory=list)
    gpu_load_pct: Optional[int] = None
    gpu_freq_mhz: list[int] = field(default_factory=list)
    emc_load_pct: Optional[int] = None
    emc_freq_mhz: Optional[int] = None
    temps_c: dict[str, float] = field(default_factory=dict)
    rails_mw: dict[str, int] = field(default_factory=dict)  # instantaneous
    rails_avg_mw: dict[str, int] = field(default_factory=dict)  # tegrastats' running average
    t_monotonic: Optional[float] = None  # when the line was read (sampler only)

    def total_power_mw(self, rails: Optional[Iterable[str]] = None) -> tuple[Optional[int], str]:
        """(total board power in mW, description of what was summed)."""
        if rails:
            rails = list(rails)
            present = [r for r in rails if r in self.rails_mw]
            if not present:
                return None, f"none of {rails} in this line"
            return sum(self.rails_mw[r] for r in present), "+".join(present)
        for r in INPUT_RAILS:
            if r in self.rails_mw:
                return self.rails_mw[r], r
        if self.rails_mw:
            names = sorted(self.rails_mw)
            return sum(self.rails_mw.values()), "sum(" + ",".join(names) + ")"
        return None, "no power rails in this line"


def parse_line(line: str) -> Optional[TegraSample]:
    """Parse one tegrastats line; ``None`` for lines that are not tegrastats output."""
    line = line.strip()
    if "RAM " not in line:
        return None
    s = TegraSample()
    m = _TS.match(line)
    if m:
        s.timestamp = m.group(1)
    m = _RAM.search(line)
    if m:
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    m = _SWAP.search(line)
    if m:
        s.swap_used_mb = int(m.group(1))
    m = _CPU.search(line)
    if m:
        for tok in m.group(1).split(","):
            tok = tok.strip()
            if tok == "off" or not tok:
                s.cpu_load_pct.append(None)
                s.cpu_freq_mhz.append(None)
                continue
            load, _, freq = tok.partition("@")
            s.cpu_load_pct.append(int(load.rstrip("%")) if load.rstrip("%").isdigit() else None)
            s.cpu_freq_mhz.append(int(freq) if freq.isdigit() else None)
    m = _GR3D.search(line)
    if m:
        s.gpu_load_pct = int(m.group(1))
        if m.group(2):
            s.gpu_freq_mhz = [int(f) for f in m.group(2).split(",") if f]
    m = _EMC.search(line)
    if m:
        s.emc_load_pct = int(m.group(1))
        s.emc_freq_mhz = int(m.group(2)) if m.group(2) else None
    for name, val in _TEMP.findall(line):
        s.temps_c[name] = float(val)
    for name, cur, avg in _RAIL.findall(line):
        if name in _NOT_RAILS:
            continue
        s.rails_mw[name] = int(cur)
        s.rails_avg_mw[name] = int(avg)
    return s


def parse_lines(lines: Iterable[str]) -> list[TegraSample]:
    return [s for s in (parse_line(l) for l in lines) if s is not None]


def summarize(samples: list[TegraSample], *, rails: Optional[Iterable[str]] = None,
              duration_s: Optional[float] = None, inferences: Optional[int] = None) -> dict[str, Any]:
    """Mean/peak power over ``samples``; energy per inference when duration and count are given."""
    totals, sources = [], set()
    for s in samples:
        p, src = s.total_power_mw(rails)
        if p is not None:
            totals.append(p)
            sources.add(src)
    out: dict[str, Any] = {"samples": len(samples), "power_samples": len(totals)}
    if not totals:
        out["error"] = "no power readings (tegrastats printed no rails)"
        return out
    mean_mw = sum(totals) / len(totals)
    out.update(
        mean_power_mw=mean_mw,
        peak_power_mw=max(totals),
        min_power_mw=min(totals),
        total_source=sorted(sources),
    )
    rail_means: dict[str, float] = {}
    for name in sorted({n for s in samples for n in s.rails_mw}):
        vals = [s.rails_mw[name] for s in samples if name in s.rails_mw]
        rail_means[name] = sum(vals) / len(vals)
    out["rail_mean_mw"] = rail_means
    ram = [s.ram_used_mb for s in samples if s.ram_used_mb is not None]
    if ram:
        out["board_ram_used_max_mb"] = max(ram)  # whole board (Jetson memory is shared with the GPU)
    gpu = [s.gpu_load_pct for s in samples if s.gpu_load_pct is not None]
    if gpu:
        out["gpu_load_mean_pct"] = sum(gpu) / len(gpu)
    temps = {k for s in samples for k in s.temps_c}
    out["temp_max_c"] = {k: max(s.temps_c[k] for s in samples if k in s.temps_c) for k in sorted(temps)}
    if duration_s is not None and inferences:
        out["duration_s"] = duration_s
        out["inferences"] = inferences
        out["energy_mj"] = mean_mw * duration_s / inferences  # mW * s = mJ
    return out


class TegrastatsSampler:
    """Run ``tegrastats --interval MS`` in the background and collect parsed samples.

    ``with TegrastatsSampler() as ts: ...; window = ts.samples_between(t0, t1)``. If tegrastats is
    not installed, ``available`` is False and nothing is started (never raises for that)."""

    def __init__(self, interval_ms: int = 100, command: str = "tegrastats") -> None:
        self.interval_ms = int(interval_ms)
        self.command = command
        self.available = shutil.which(command) is not None
        self.samples: list[TegraSample] = []
        self.raw_lines: list[str] = []
        self._proc: Optional[subprocess.Popen] = None
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None if self.available else f"{command!r} not found on PATH"

    def start(self) -> "TegrastatsSampler":
        if not self.available:
            return self
        try:
            self._proc = subprocess.Popen(
                [self.command, "--interval", str(self.interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as e:
            self.available = False
            self.error = f"cannot start {self.command}: {e}"
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()
            s = parse_line(line)
            if s is not None:
                s.t_monotonic = now
                self.samples.append(s)
                self.raw_lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=3)
        if self._thread is not None:
            self._thread.join(timeout=3)

    def samples_between(self, t0: float, t1: float) -> list[TegraSample]:
        """Samples read within [t0, t1] (``time.monotonic`` seconds)."""
        return [s for s in self.samples if s.t_monotonic is not None and t0 <= s.t_monotonic <= t1]

    def __enter__(self) -> "TegrastatsSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# Jetson memory: CPU and GPU share the board's RAM; GPU buffers come from nvmap and are NOT in the
# process's RSS, so the peak RSS alone under-counts what a model needs on a Jetson.
# ------------------------------------------------------------------------------------------------
NVMAP_CLIENTS = "/sys/kernel/debug/nvmap/iovmm/clients"
_NVMAP_LINE = re.compile(r"^\s*\S+\s+(\S+)\s+(\d+)\s+(\d+)([KMG]?)\s*$")


def nvmap_client_mb(pid: int, path: str = NVMAP_CLIENTS) -> Optional[float]:
    """nvmap (GPU) memory held by ``pid`` in MiB, from the nvmap debugfs client table
    ("CLIENT PROCESS PID SIZE" lines, sizes in K); None when the table is not readable (needs root)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        m = _NVMAP_LINE.match(line)
        if m and int(m.group(2)) == int(pid):
            scale = {"": 1.0 / 1024.0, "K": 1.0 / 1024.0, "M": 1.0, "G": 1024.0}[m.group(4)]
            total += int(m.group(3)) * scale
            seen = True
    return total if seen else 0.0


def jetson_peak_memory(peak_rss_mb: Optional[float], rss_before_load_mb: Optional[float],
                       board_ram_before_load_mb: Optional[int], samples: list,
                       nvmap_mb: Optional[float] = None) -> dict:
    """``peak_memory_mb`` on a Jetson: the process's peak RSS plus its GPU (nvmap) memory.

    nvmap comes from the debugfs client table when readable (``nvmap_mb``); otherwise from
    tegrastats: the board's RAM peak during the run minus the RAM in use before the model loaded
    is what this benchmark added (CPU and GPU); what of it the RSS does not hold is GPU memory."""
    out: dict = {"peak_rss_mb": peak_rss_mb}
    if peak_rss_mb is None:
        return out
    if nvmap_mb is not None:
        out.update(nvmap_mb=nvmap_mb, peak_memory_mb=peak_rss_mb + nvmap_mb, source="peak RSS + nvmap client table")
        return out
    ram = [s.ram_used_mb for s in samples if getattr(s, "ram_used_mb", None) is not None]
    if ram and board_ram_before_load_mb is not None:
        added = max(ram) - board_ram_before_load_mb
        rss_added = peak_rss_mb - (rss_before_load_mb or 0.0)
        gpu = max(0.0, added - rss_added)
        out.update(board_ram_peak_mb=max(ram), board_ram_before_load_mb=board_ram_before_load_mb,
                   board_ram_added_mb=added, nvmap_mb=gpu, peak_memory_mb=peak_rss_mb + gpu,
                   source="peak RSS + (tegrastats RAM added during the run - RSS added)")
        return out
    out.update(peak_memory_mb=peak_rss_mb, source="peak RSS only (no tegrastats RAM and no nvmap table: GPU "
                                                  "memory not counted)")
    return out
