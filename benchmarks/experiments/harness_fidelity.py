"""Does our harness agree with OpenVINO's own ``benchmark_app``? (host-side check; torch is used
only to build the model, never by the harness itself)

    python benchmarks/experiments/harness_fidelity.py [--duration 10] [--rounds 5] [--threads 2] [--model IR.xml]

Builds an OpenVINO IR of a CIFAR ResNet-56 (random init is fine for latency; static shape
1x3x32x32, fp32 weights), then alternates, ``--rounds`` times, our harness (warm-up by time, then
>= ``--duration`` s) and ``benchmark_app`` on the same IR with the same settings:

    benchmark_app -m model.xml -d CPU -hint none -nthreads 2 -nstreams 1 -b 1 -t 10 \\
        -infer_precision f32 -api sync

(``-hint none`` because benchmark_app refuses -nthreads/-nstreams with a hint; OpenVINO's CPU plugin
still reports PERFORMANCE_HINT=LATENCY for that configuration, and our compiled model is given
exactly the properties benchmark_app sets: INFERENCE_NUM_THREADS, NUM_STREAMS,
INFERENCE_PRECISION_HINT). The two tools are timed in alternating passes (``benchmarks/experiments/paired.py``:
ours, benchmark_app, then benchmark_app, ours, ...); the ratio is the median of the per-pass ratios
(robust to a minority of passes hit by other processes), printed with its spread and the load
average before and after.

The last line printed is exactly::

    fidelity openvino ours_p50_ms=<float> benchmark_app_p50_ms=<float> ratio=<float>

with ratio = ours / benchmark_app (target: within 10 %, i.e. 0.9 <= ratio <= 1.1).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from benchmarks.board.atomic import atomic_write_json  # noqa: E402
from benchmarks.board.harness import MeasureConfig, measure  # noqa: E402
from benchmarks.board.runner_base import random_feeds  # noqa: E402
from benchmarks.board.runner_openvino import OpenVINORunner  # noqa: E402
from benchmarks.experiments.paired import alternating  # noqa: E402

_MEDIAN = re.compile(r"Median:\s*([0-9.]+)\s*ms")


def build_resnet56_ir(dest: Path) -> Path:
    import openvino as ov
    import torch

    from sglp_edge.models.cifar_resnet import cifar_resnet  # heavy: imports torch; this module imports without it

    torch.manual_seed(0)
    model = cifar_resnet(56).eval()
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=torch.randn(1, 3, 32, 32))
    ov_model.reshape([1, 3, 32, 32])
    xml = dest / "resnet56.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return xml


def run_ours(xml: Path, threads: int, duration: float, warmup: float) -> dict:
    with OpenVINORunner(xml, threads=threads, streams=1, precision="fp32", hint=None,
                        extra_config={"PERF_COUNT": "NO"}) as r:
        fn = r.bind(random_feeds(r.inputs))
        m = measure(fn, MeasureConfig(warmup_s=warmup, min_iters=100, min_duration_s=duration), sync=r.sync)
        info = r.info()
    st = m.stats()
    return {"p50_ms": st["p50_ms"], "mean_ms": st["mean_ms"], "iterations": st["iterations"],
            "precision_used": info["precision_used"], "threads_used": info["threads_used"],
            "streams_used": info["streams_used"], "performance_hint": info["performance_hint"]}


def run_benchmark_app(exe: str, xml: Path, threads: int, duration: float) -> dict:
    cmd = [exe, "-m", str(xml), "-d", "CPU", "-hint", "none", "-nthreads", str(threads), "-nstreams", "1",
           "-b", "1", "-t", str(int(round(duration))), "-infer_precision", "f32", "-api", "sync"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 4 + 120)
    out = p.stdout + p.stderr
    m = _MEDIAN.search(out)
    if p.returncode != 0 or not m:
        tail = "\n".join(out.strip().splitlines()[-8:])
        raise SystemExit(f"error: benchmark_app failed (exit {p.returncode}):\n{tail}")
    count = re.search(r"Count:\s*(\d+)", out)
    prec = re.search(r"INFERENCE_PRECISION_HINT:\s*(.+)", out)
    return {"p50_ms": float(m.group(1)), "iterations": int(count.group(1)) if count else None,
            "precision_used": prec.group(1).strip() if prec else None, "command": cmd}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (benchmark_app -t)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating passes of ours / benchmark_app")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=1.0, help="our warm-up seconds")
    ap.add_argument("--model", type=Path, help="use this OpenVINO IR instead of building ResNet-56")
    ap.add_argument("--json", type=Path, help="also write the per-round figures here")
    args = ap.parse_args(argv)

    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    if not Path(exe).exists():
        print("error: benchmark_app not found: pip install openvino (it ships the benchmark_app script)", file=sys.stderr)
        return 2
    passes: list = []

    def timed(which: str) -> float:
        rec = run_ours(xml, args.threads, args.duration, args.warmup) if which == "ours" else \
            run_benchmark_app(exe, xml, args.threads, args.duration)
        passes.append({"tool": which, **rec})
        return rec["p50_ms"]

    with tempfile.TemporaryDirectory(prefix="fidelity.") as tmp:
        xml = args.model or build_resnet56_ir(Path(tmp))
        r = alternating(lambda: timed("ours"), lambda: timed("benchmark_app"), args.rounds, log=print,
                        label="ours / benchmark_app ")
    ours_p50, bapp_p50, ratio = r["a"], r["b"], r["ratio"]
    if args.json:
        atomic_write_json(args.json, {"passes": passes, "loadavg": r["loadavg"], "rounds_ratio": r["rounds_ratio"],
                                      "ours_p50_ms": ours_p50, "benchmark_app_p50_ms": bapp_p50, "ratio": ratio,
                                      "spread": r["spread"], "threads": args.threads, "duration_s": args.duration})
    print(f"load average before / after: {r['loadavg'][0]} / {r['loadavg'][1]}; per-pass ratios spread "
          f"{r['spread'][0]:.3f}-{r['spread'][1]:.3f}")
    verdict = "within" if abs(ratio - 1.0) <= 0.10 else "OUTSIDE"
    print(f"ratio {ratio:.3f} is {verdict} the 10 % target")
    print(f"fidelity openvino ours_p50_ms={ours_p50:.4f} benchmark_app_p50_ms={bapp_p50:.4f} ratio={ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
