"""Pruned-vs-original latency speedup of the default SGLP-pruned ResNet-56 on ONNX Runtime and
OpenVINO (batch 1, FP32, same threads), next to the MACs ratio (the physical limit).

    python benchmarks/speedup.py [--run runs/default] [--keep 14] [--threads 2] [--rounds 3]

With ``--run`` it measures the ONNX files of a finished ``sglp-edge run`` folder; otherwise it
prunes the default model itself (SGLP, --keep) and exports both. Measurements alternate original
and pruned in rounds, and each figure is the median of the per-round medians (these machines are
noisy). Host-side script; the summary line is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _prepare(tmp: Path, keep: int) -> tuple[Path, Path, float, str]:
    import torch

    from sglp_edge.export import export_onnx
    from sglp_edge.models.registry import DEFAULT_MODEL, load_model
    from sglp_edge.pruning_job import PruneJob, run_prune_job

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


def _measure(backend: str, path: Path, threads: int, duration: float) -> float:
    from benchmarks.harness import MeasureConfig, measure
    from benchmarks.runners import open_runner, random_feeds

    r = open_runner(backend, path, threads=threads, precision="fp32", input_shapes={"input": [1, 3, 32, 32]})
    try:
        r.set_batch(1)
        fn = r.bind(random_feeds(r.inputs))
        m = measure(fn, MeasureConfig(warmup_s=0.5, min_iters=100, min_duration_s=duration), sync=r.sync)
        return float(m.stats()["p50_ms"])
    finally:
        close = getattr(r, "close", None)
        if callable(close):
            close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished `sglp-edge run` folder to take the ONNX files from")
    ap.add_argument("--keep", type=int, default=14)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    args = ap.parse_args(argv)

    import openvino as ov

    from exporters.compile import compile_model

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
        print(f"model: {which}; threads {args.threads}, batch 1, fp32, OpenVINO {ov.__version__}")
        p50 = {k: [] for k in arts}
        for rnd in range(args.rounds):
            for backend in ("onnxruntime", "openvino"):
                for name in ("original", "pruned"):
                    p50[(backend, name)].append(_measure(backend, arts[(backend, name)], args.threads, args.duration))
            print(f"round {rnd + 1}: " + ", ".join(f"{b}/{n} p50 {v[-1]:.3f} ms" for (b, n), v in p50.items()))
    med = {k: statistics.median(v) for k, v in p50.items()}
    sp = {b: med[(b, "original")] / med[(b, "pruned")] for b in ("onnxruntime", "openvino")}
    for b in ("onnxruntime", "openvino"):
        print(f"{b}: original p50 {med[(b, 'original')]:.3f} ms, pruned p50 {med[(b, 'pruned')]:.3f} ms, "
              f"speedup {sp[b]:.2f}x (MACs ratio {macs_ratio:.2f}x)")
    print(f"speedup ort={sp['onnxruntime']:.3f} openvino={sp['openvino']:.3f} macs_ratio={macs_ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
