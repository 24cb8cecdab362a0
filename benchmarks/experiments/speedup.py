"""Pruned-vs-original latency speedup of the default SGLP-pruned ResNet-56 on ONNX Runtime and
OpenVINO (batch 1, FP32, same threads), next to the MACs ratio (the physical limit).

    python benchmarks/experiments/speedup.py [--run runs/default] [--keep 14] [--threads 2] [--passes 24]

With ``--run`` it measures the ONNX files of a finished ``sglp-edge run`` folder; otherwise it
prunes the default model itself (SGLP, --keep) and exports both. Both networks stay loaded; they are
timed in alternating passes (original, pruned, then pruned, original, ...) and the speedup is the
median of the per-pass ratios (``benchmarks/experiments/paired.py``), printed with its spread and the load
average. A speedup more than 15 % above the MACs ratio (the limit of what removing work saves; see
``MACS_TOLERANCE``) is a measuring fault: it is measured again, and if it persists the script exits
3 without a summary line. Host-side
script; the summary line is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.board.harness import MeasureConfig, measure  # noqa: E402
from benchmarks.board.runner_base import random_feeds  # noqa: E402
from benchmarks.board.runners import open_runner  # noqa: E402
from benchmarks.experiments.paired import MeasuringFault, paired_ratio  # noqa: E402
from exporters.compile import compile_model  # noqa: E402


def _prepare(tmp: Path, keep: int) -> tuple[Path, Path, float, str]:
    import torch

    # heavy: these import torch; only this path (no --run: prune and export here) needs it
    from sglp_edge.export.onnx_export import export_onnx
    from sglp_edge.models.registry import DEFAULT_MODEL, load_model  # heavy: torch, as above
    from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job  # heavy: torch, as above

    if (DEFAULT_MODEL / "sglp_model.json").is_file():
        loaded, which = load_model("default"), "trained default"
    else:
        torch.manual_seed(0)
        loaded, which = load_model("cifar_resnet56"), "randomly initialised ResNet-56 (trained default not shipped yet)"
    res = run_prune_job(PruneJob(model="default", out=tmp / "pruned", keep=keep, calib_batches=2, batch_size=64),
                        loaded=loaded)
    x = torch.randn(1, 3, 32, 32)
    export_onnx(loaded.model, x, tmp / "original.onnx", progress=False)
    export_onnx(res.pruned, x, tmp / "pruned.onnx", progress=False)
    return tmp / "original.onnx", tmp / "pruned.onnx", res.plan.macs_before / res.plan.macs_after, which


#: how far above the MACs ratio a speedup is still read as a result. The MACs ratio bounds what removed
#: work alone can save; the smaller network also runs each remaining MAC a little faster (its weights and
#: activations stay in cache; the 16-channel blocks that go first are the slowest per MAC), which
#: measured here as a median 0-6 % above it, run after run. Beyond 15 % it is a measuring fault.
MACS_TOLERANCE = 0.15


class _Timer:
    """One artifact's runner, opened once and warmed up; each call times one pass (p50 in ms)."""

    def __init__(self, backend: str, path: Path, threads: int, pass_s: float):
        self.r = open_runner(backend, path, threads=threads, precision="fp32", input_shapes={"input": [1, 3, 32, 32]})
        self.r.set_batch(1)
        self.fn = self.r.bind(random_feeds(self.r.inputs))
        self.cfg = MeasureConfig(warmup_s=0.05, min_iters=20, min_duration_s=pass_s)
        self.warm = MeasureConfig(warmup_s=1.0, min_iters=20, min_duration_s=0.5)

    def warm_up(self) -> None:
        measure(self.fn, self.warm, sync=self.r.sync)

    def __call__(self) -> float:
        return float(measure(self.fn, self.cfg, sync=self.r.sync).stats()["p50_ms"])

    def close(self) -> None:
        close = getattr(self.r, "close", None)
        if callable(close):
            close()


def _speedup(backend: str, orig: Path, pruned: Path, macs_ratio: float, args: argparse.Namespace) -> dict:
    """Original / pruned p50 in alternating passes (benchmarks/experiments/paired.py), never above the MACs ratio."""
    a = _Timer(backend, orig, args.threads, args.pass_s)
    b = _Timer(backend, pruned, args.threads, args.pass_s)
    try:
        a.warm_up()
        b.warm_up()
        return paired_ratio(a, b, passes=args.passes, limit=macs_ratio, retries=args.retries, label=f"{backend}: ",
                            tolerance=MACS_TOLERANCE, log=print if args.verbose else None)
    finally:
        a.close()
        b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished `sglp-edge run` folder to take the ONNX files from")
    ap.add_argument("--keep", type=int, default=14)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=24, help="alternating passes per backend (original, pruned)")
    ap.add_argument("--pass-s", type=float, default=0.4, help="seconds each artifact is timed in one pass")
    ap.add_argument("--retries", type=int, default=2, help="re-measurements when a ratio is above the MACs ratio")
    ap.add_argument("--verbose", action="store_true", help="print every pass")
    args = ap.parse_args(argv)

    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="sglp-speedup-") as t:
        tmp = Path(t)
        if args.run:
            plan = json.loads((args.run / "prune" / "plan.json").read_text())
            orig, pruned = args.run / "export" / "original.onnx", args.run / "export" / "pruned.onnx"
            macs_ratio, which = plan["macs_before"] / plan["macs_after"], f"run folder {args.run}"
        else:
            orig, pruned, macs_ratio, which = _prepare(tmp, args.keep)
        arts = {}
        for name, onnx_path in (("original", orig), ("pruned", pruned)):
            compile_model(onnx_path, "openvino", "fp32", tmp / f"ov-{name}", progress=False)
            arts[("openvino", name)] = tmp / f"ov-{name}" / "model.xml"
            arts[("onnxruntime", name)] = onnx_path
        print(f"model: {which}; threads {args.threads}, batch 1, fp32, OpenVINO {ov.__version__}; "
              f"{args.passes} alternating passes of {args.pass_s:g} s per backend")
        sp = {}
        for b in ("onnxruntime", "openvino"):
            try:
                r = _speedup(b, arts[(b, "original")], arts[(b, "pruned")], macs_ratio, args)
            except MeasuringFault as e:
                print(f"error: {e}", file=sys.stderr)
                return 3
            sp[b] = r["ratio"]
            print(f"{b}: original p50 {r['a']:.3f} ms, pruned p50 {r['b']:.3f} ms, speedup {r['ratio']:.3f}x "
                  f"(median of {r['passes']} per-pass ratios, spread {r['spread'][0]:.3f}-{r['spread'][1]:.3f}, "
                  f"IQR {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f}; MACs ratio {macs_ratio:.3f}x; load average "
                  f"{r['loadavg'][0]} -> {r['loadavg'][1]}; {len(r['faults'])} measuring fault(s) re-measured)")
    print(f"speedup ort={sp['onnxruntime']:.3f} openvino={sp['openvino']:.3f} macs_ratio={macs_ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
