"""Host-side benchmark script: the demo's pruned ResNet-56 on the ARM builds of ONNX Runtime and
OpenVINO, under user-mode emulation (qemu-aarch64, CPU neoverse-n1), against PyTorch's logits.

    python benchmarks/experiments/arm_emulated.py [--run RUN_DIR] [--samples 500] [--keep 16] [--workdir DIR]

Without ``--run`` it makes the artifacts itself: SGLP-prunes the shipped default ResNet-56 to
``--keep`` of its 28 units (as ``sglp-edge prune default --keep 16``), exports the pruned network
to ONNX and compiles it to an OpenVINO FP32 IR. With ``--run`` it takes a finished
``sglp-edge run`` folder's ``export/pruned.onnx`` and ``eval_data/eval_pruned.npz`` (PyTorch logits
of its final model). The emulated ARM board (``sglp_edge.targets``; set up once, cached in
``~/.cache/sglp-edge/arm64``) then runs the board harness on each artifact over ``--samples``
held-out Fashion-MNIST test images and compares with PyTorch. The last line printed:

    arm emulated=qemu-aarch64 ort_max_abs=<f> ort_top1_agree=<f> openvino_max_abs=<f> openvino_top1_agree=<f> setup_s=<f>

``setup_s`` is the time this run spent setting up the emulated board (about half a minute into an
empty cache, well under a second when the cache is already there; ``--cache DIR`` chooses it).
Targets: FP32 max abs at most 1e-4 and top-1 agreement at least 0.999. Exit 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.board.calib import save_npz  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402
from exporters.compile import compile_model  # noqa: E402
from sglp_edge.profiles.load import load_profile  # noqa: E402
from sglp_edge.targets import arm64_env  # noqa: E402
from sglp_edge.targets.base import BenchJob  # noqa: E402
from sglp_edge.targets.emulated import EmulatedArmTarget  # noqa: E402

MAX_ABS, AGREE = 1e-4, 0.999
PROFILES = {"ort": "raspberry-pi-5", "openvino": "arm64-cpu-openvino"}


def make_artifacts(work: Path, keep: int, samples: int, seed: int) -> tuple[Path, Path]:
    """Prune the shipped default, export it; write eval.npz (held-out images, labels, PyTorch logits)."""
    import numpy as np
    import torch

    # heavy: these import torch; only this path (no --run: prune here) needs it
    from sglp_edge.data.datasets import get_dataset
    from sglp_edge.export.onnx_export import export_onnx  # heavy: torch, as above
    from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job  # heavy: torch, as above

    onnx_path, eval_path = work / "pruned.onnx", work / "eval.npz"
    if onnx_path.is_file() and eval_path.is_file():
        print(f"reusing {onnx_path} and {eval_path}", file=sys.stderr)
        return onnx_path, eval_path
    torch.manual_seed(seed)
    print(f"pruning the shipped default ResNet-56 to {keep} of 28 units (SGLP)", file=sys.stderr)
    res = run_prune_job(PruneJob(model="default", out=work / "prune", keep=keep, seed=seed), show_progress=True)
    model = res.pruned.eval()
    test = get_dataset("fashion-mnist", seed=seed).split("test")
    n = min(samples, len(test))
    x = torch.stack([test[i][0] for i in range(n)])
    y = np.array([int(test[i][1]) for i in range(n)], dtype=np.int64)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 250]) for i in range(0, n, 250)]).numpy().astype(np.float32)
    export_onnx(model, x[:1], onnx_path, kind="image", parity_inputs=x[:256], parity_labels=y[:256],
                parity_source="held-out test images", progress=False)
    save_npz(eval_path, x.numpy().astype(np.float32), y, logits=logits)
    return onnx_path, eval_path


def from_run(run: Path, work: Path, samples: int) -> tuple[Path, Path]:
    import numpy as np

    onnx_path, ev = run / "export" / "pruned.onnx", run / "eval_data" / "eval_pruned.npz"
    for p in (onnx_path, ev):
        if not p.is_file():
            raise SystemExit(f"error: {p} not found: give the folder of a finished `sglp-edge run`")
    with np.load(ev) as z:
        arrays = {k: z[k][:samples] if z[k].ndim else z[k] for k in z.files}
    out = work / "eval.npz"
    np.savez(out, **arrays)
    return onnx_path, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished `sglp-edge run` folder (default: prune the shipped model)")
    ap.add_argument("--samples", type=int, default=500, help="held-out test images (default 500)")
    ap.add_argument("--keep", type=int, default=16, help="units kept when pruning here (default 16 of 28)")
    ap.add_argument("--workdir", type=Path, help="keep the pruned model and artifacts here (default: a temp folder)")
    ap.add_argument("--cache", type=Path, help="emulated-board cache (default ~/.cache/sglp-edge/arm64)")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads inside the emulator (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="arm_emulated.")
        work = Path(tmp.name)
    else:
        work = a.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if a.cache:
            os.environ["SGLP_EDGE_ARM64_CACHE"] = str(a.cache)
        setup = arm64_env.ensure(("onnxruntime", "openvino"), progress=lambda m: print(m, file=sys.stderr))
        setup_s = time.perf_counter() - t0
        print(f"emulated board: {setup['python']} (QEMU_CPU={setup['qemu_cpu']}, aarch64 {setup['versions']}); "
              f"set-up {setup_s:.1f} s", file=sys.stderr)
        onnx_path, eval_path = from_run(a.run, work, a.samples) if a.run else make_artifacts(work, a.keep, a.samples,
                                                                                              a.seed)
        ov_dir = work / "openvino-fp32"
        if not (ov_dir / "model.xml").is_file():
            compile_model(onnx_path, "openvino", "fp32", ov_dir, progress=False)
        figures = {}
        for key, art in (("ort", onnx_path), ("openvino", ov_dir / "model.xml")):
            prof = load_profile(PROFILES[key])
            target = EmulatedArmTarget(label=f"{prof.name}-emulated", profile=prof)
            target.prepare(prof.backend)
            t1 = time.perf_counter()
            print(f"{key}: running the board harness on the aarch64 {prof.backend} under emulation "
                  f"({a.samples} images)", file=sys.stderr)
            run = target.bench(BenchJob(artifact=art, data=eval_path, profile=prof, out_dir=work / f"bench-{key}",
                                        overrides={"threads": a.threads, "max_eval": a.samples, "eval_batch": 50},
                                        label=key))
            if not run.ok:
                raise UserError(f"{key} on the emulated ARM board failed: {run.error} (logs in {run.out_dir})")
            doc = run.result
            agr = doc["accuracy"]["agreement"]
            figures[key] = {"max_abs": float(agr["max_abs_diff"]), "top1_agree": agr["top1_agreement_pct"] / 100.0,
                            "samples": doc["accuracy"]["samples"], "machine": doc["env"]["machine"],
                            "precision_used": doc["runtime"].get("precision_used"),
                            "version": doc["runtime"].get("runtime_version"), "wall_s": time.perf_counter() - t1}
            print(f"{key}: {json.dumps(figures[key])}", file=sys.stderr)
            if figures[key]["machine"] != "aarch64" or figures[key]["samples"] != a.samples:
                raise UserError(f"{key}: ran on {figures[key]['machine']} over {figures[key]['samples']} samples; "
                                f"expected aarch64 over {a.samples}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    ok = all(f["max_abs"] <= MAX_ABS and f["top1_agree"] >= AGREE for f in figures.values())
    print(f"arm emulated=qemu-aarch64 ort_max_abs={figures['ort']['max_abs']:.3g} "
          f"ort_top1_agree={figures['ort']['top1_agree']:.4f} openvino_max_abs={figures['openvino']['max_abs']:.3g} "
          f"openvino_top1_agree={figures['openvino']['top1_agree']:.4f} setup_s={setup_s:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
