"""Parsers for trtexec's console log and ``--exportTimes`` JSON, and for the DLA/GPU layer
placement a TensorRT build reports (numpy only; no TensorRT needed; Python 3.8 compatible)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.board.errors import UserError

# ---------------------------------------------------------------------------------------------
# trtexec output parsers
# ---------------------------------------------------------------------------------------------
_METRICS = {"Latency": "latency", "End-to-End Host Latency": "end_to_end", "Enqueue Time": "enqueue",
            "H2D Latency": "h2d", "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}
_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_LINE = re.compile(r"^(?:\[[^\]]*\]\s*)*\[(?P<sev>[IWEVF])\]\s?(?P<msg>.*)$")


def _pkey(p: Any) -> str:
    return format(float(p), "g")


def _trt_version_from_tag(tag: str) -> str:
    n = int(tag)
    if n >= 10000:  # 10.x and later: v100300 = 10.3.0
        return f"{n // 10000}.{(n // 100) % 100}.{n % 100}"
    return f"{n // 1000}.{(n // 100) % 10}.{n % 100}"  # 8.x: v8601 = 8.6.1


def parse_trtexec_log(text: str) -> dict[str, Any]:
    """Figures from trtexec's console output (TensorRT 8.4 .. 10.x format).

    Returns the status (PASSED / FAILED / incomplete), the command, TensorRT version, build options
    (precision), device, throughput, per-metric min/max/mean/median/percentiles in ms, totals,
    warm-up and trace counts, engine build time / size, and the warning / error lines."""
    res: dict[str, Any] = {"status": "incomplete", "metrics": {}, "warnings": [], "errors": []}
    m = re.search(r"&&&& RUNNING TensorRT\.trtexec \[TensorRT v(\d+)\](?: \[[^\]]*\])? # (.*)", text)
    if m:
        res["trt_version"] = _trt_version_from_tag(m.group(1))
        res["command"] = m.group(2).strip()
    if re.search(r"^&&&& PASSED", text, re.M):
        res["status"] = "passed"
    elif re.search(r"^&&&& FAILED", text, re.M):
        res["status"] = "failed"
    simple = {
        "trt_version": (r"TensorRT version: ([\d.]+)", str),
        "precision": (r"\[I\] Precision: (\S+)", str),
        "device": (r"Selected Device: (.+)", str),
        "compute_capability": (r"Compute Capability: ([\d.]+)", str),
        "throughput_qps": (r"Throughput: " + _NUM + " qps", float),
        "total_host_walltime_s": (r"Total Host Walltime: " + _NUM + " s", float),
        "total_gpu_compute_s": (r"Total GPU Compute Time: " + _NUM + " s", float),
        "engine_build_s": (r"Engine built in " + _NUM + " sec", float),
        "engine_size_mib": (r"Created engine with size: " + _NUM + " MiB", float),
        "dla_core": (r"\[I\] DLACore: (\d+)", int),
    }
    for key, (pat, typ) in simple.items():
        mm = re.search(pat, text)
        if mm:
            res[key] = typ(mm.group(1).strip())
    mm = re.search(r"Warmup completed (\d+) queries over " + _NUM + " ms", text)
    if mm:
        res["warmup_queries"], res["warmup_ms"] = int(mm.group(1)), float(mm.group(2))
    mm = re.search(r"Timing trace has (\d+) queries over " + _NUM + " s", text)
    if mm:
        res["timed_queries"], res["timed_s"] = int(mm.group(1)), float(mm.group(2))
    for label, key in _METRICS.items():
        mm = re.search(r"\] " + re.escape(label) + r": (min = .*)$", text, re.M)
        if not mm:
            continue
        line = mm.group(1)
        stats: dict[str, Any] = {}
        for stat in ("min", "max", "mean", "median"):
            s = re.search(rf"\b{stat} = {_NUM} ms", line)
            if s:
                stats[stat] = float(s.group(1))
        pct = {_pkey(p): float(v)
               for p, v in re.findall(r"percentile\((\d+(?:\.\d+)?)%\) = " + _NUM + " ms", line)}
        if pct:
            stats["percentiles"] = pct
        res["metrics"][key] = stats
    for line in text.splitlines():
        lm = _LINE.match(line.strip())
        if lm and lm.group("sev") == "W":
            res["warnings"].append(lm.group("msg").strip())
        elif lm and lm.group("sev") in ("E", "F"):
            res["errors"].append(lm.group("msg").strip())
    if res["status"] == "incomplete" and "command" not in res and not res["metrics"]:
        raise UserError("this does not look like trtexec output (no '&&&& RUNNING TensorRT.trtexec' header "
                        "and no performance summary)")
    return res


def trtexec_percentile(sorted_values: np.ndarray, percentile: float) -> float:
    """trtexec's own percentile rule (samples/common/sampleReporting.cpp: findPercentile)."""
    n = len(sorted_values)
    if n == 0:
        return math.inf
    f32 = np.float32  # the C++ computes in float: (1 - percentile / 100) * all
    exclude = int((f32(1) - f32(percentile) / f32(100)) * f32(n))
    return float(sorted_values[max(n - 1 - exclude, 0)])


_TIME_KEYS = {  # current (TensorRT 10) name, pre-10 name
    "h2d": ("h2dMs", "inMs"), "compute": ("computeMs", "computeMs"), "d2h": ("d2hMs", "outMs"),
    "latency": ("latencyMs", "latencyMs"), "end_to_end": ("endToEndMs", "endToEndMs"),
}


def parse_export_times(path_or_text: str | Path, *, warmup_ms: float | None = None,
                       percentiles: Sequence[float] = (50, 90, 95, 99)) -> dict[str, Any]:
    """Per-iteration times from ``trtexec --exportTimes=FILE`` (list of objects with startEnqMs,
    endEnqMs, startH2dMs, ..., h2dMs, computeMs, d2hMs, latencyMs, endToEndMs; pre-10 files use
    startInMs/inMs/outMs). ``warmup_ms`` drops iterations whose compute started earlier, as trtexec's
    own summary does. Returns raw per-iteration arrays and summary statistics in ms."""
    text = str(path_or_text)
    p = Path(text) if len(text) < 4096 and "\n" not in text else None
    if p is not None and p.is_file():
        text = p.read_text()
    elif p is not None and not text.lstrip().startswith("["):
        raise UserError(f"trtexec times file {p} does not exist")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"trtexec --exportTimes output is not valid JSON ({e.msg} at line {e.lineno}); "
                        "was the run interrupted?") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError("trtexec --exportTimes output must be a non-empty JSON list of per-iteration objects")
    if warmup_ms is not None:
        start_key = "startComputeMs"
        rows = [r for r in rows if float(r.get(start_key, 0.0)) >= warmup_ms]
        if not rows:
            raise UserError(f"no iterations left after dropping the first {warmup_ms} ms of warm-up")
    series: dict[str, np.ndarray] = {}
    for key, names in _TIME_KEYS.items():
        vals = [next((r[n] for n in names if n in r), None) for r in rows]
        if all(v is not None for v in vals):
            series[key] = np.asarray(vals, dtype=np.float64)
    if "startEnqMs" in rows[0] and "endEnqMs" in rows[0]:
        series["enqueue"] = np.asarray([r["endEnqMs"] - r["startEnqMs"] for r in rows], dtype=np.float64)
    if "compute" not in series and "latency" not in series:
        raise UserError("trtexec --exportTimes rows hold neither computeMs nor latencyMs")
    stats = {}
    for key, arr in series.items():
        s = np.sort(arr)
        stats[key] = {"min": float(s[0]), "max": float(s[-1]), "mean": float(s.mean()), "std": float(s.std()),
                      "median": float(np.median(s)),
                      "percentiles": {_pkey(p): trtexec_percentile(s, p) for p in percentiles}}
    out: dict[str, Any] = {"iterations": len(rows), "stats_ms": stats,
                           "per_iteration_ms": {k: v.tolist() for k, v in series.items()}}
    first = next((rows[0].get(k) for k in ("startH2dMs", "startInMs") if k in rows[0]), None)
    last = next((rows[-1].get(k) for k in ("endD2hMs", "endOutMs") if k in rows[-1]), None)
    if first is not None and last is not None and last > first:
        out["walltime_s"] = (last - first) / 1000.0
        out["throughput_qps"] = len(rows) / out["walltime_s"]
    return out


_PLACEMENT = re.compile(r"-+\s*Layers Running on (DLA|GPU)\s*-+", re.I)


def parse_dla_layers(text: str) -> dict[str, Any]:
    """Count the layers a DLA build placed on the DLA and on the GPU, from the build log
    (trtexec --verbose or the TensorRT builder's INFO log: "---------- Layers Running on DLA ----------"
    followed by one "[DlaLayer] {ForeignNode[...]}" / "[GpuLayer] NAME" line per layer).
    Returns ``{"dla": n, "gpu": m, "gpu_layers": [...], "found": bool}``: ``found`` is False when the
    log holds no placement section (then the counts say nothing)."""
    res: dict[str, Any] = {"dla": 0, "gpu": 0, "gpu_layers": [], "found": False}
    section = None
    for raw in text.splitlines():
        line = _LINE.sub(lambda m: m.group("msg"), raw.strip()) if _LINE.match(raw.strip()) else raw.strip()
        m = _PLACEMENT.search(line)
        if m:
            section, res["found"] = m.group(1).lower(), True
            continue
        if section is None:
            continue
        lm = re.search(r"\[(DlaLayer|GpuLayer)\]\s*(.*)$", line)
        if lm:
            key = "dla" if lm.group(1) == "DlaLayer" else "gpu"
            res[key] += 1
            if key == "gpu":
                res["gpu_layers"].append(lm.group(2).strip())
        elif line and not line.startswith("[TRT]") and "Layer" not in line:
            section = None
    return res
