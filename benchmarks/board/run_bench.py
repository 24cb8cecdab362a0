"""On-board benchmark entry point (argparse, numpy and the backend runtime only; no torch).

    python -m benchmarks.board.run_bench --artifact model.xml --backend openvino --threads 4 \\
        --data eval.npz --out result.json

Measures latency (warm-up by time, then min iterations AND min duration, raw times kept) at each
batch size of ``--batch-sizes`` (the first one is the *primary* batch whose figures become the
``metrics``), peak resident memory, power/energy from tegrastats on a Jetson, then accuracy of the
artifact on ``--data`` and its agreement with the stored PyTorch outputs.

Results: ``--out`` is written atomically once everything is done. While running, the same
document (``"status": "running"``, with whatever is finished) is kept up to date, atomically, in
``<out>.partial.json``, so a board that dies mid-run still leaves its finished stages behind; a
clean finish removes it. SIGTERM/SIGINT mark the partial file ``"interrupted"``.

Progress goes to stdout as lines ``@@sglp-progress {json}`` (read by the host's progress bar);
human messages go to stderr. Exit status: 0 done, 2 user error (``error: <message>``), 3 run
failed, 130 interrupted.

Test hook (not a user option): ``SGLP_EDGE_BENCH_TEST_HANG_S=N`` sleeps N seconds after the
latency stage has been written to the partial file, to simulate a board that dies mid-run.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np

if __package__ in (None, ""):  # run as a file: the bundle (or repository) root holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.board import image_bench, lm_bench  # noqa: E402
from benchmarks.board.backends import NAMES as BACKEND_NAMES  # noqa: E402
from benchmarks.board.backends import get_backend  # noqa: E402
from benchmarks.board.bench_io import log, mark_partial, partial_path  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.board.run_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="OpenVINO .xml, ONNX .onnx or TensorRT .engine")
    p.add_argument("--backend", choices=list(BACKEND_NAMES),
                   help="default: from the file suffix (onnxruntime-genai: causal-lm only, benchmarks/board/lm_bench.py)")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--data", help="evaluation .npz (see benchmarks/board/calib.py for its keys)")
    p.add_argument("--threads", type=int, help="inference threads (fixed and recorded)")
    p.add_argument("--streams", type=int, default=1, help="OpenVINO streams (default 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int4"])
    p.add_argument("--device", default="CPU", help="OpenVINO device (default CPU)")
    p.add_argument("--providers", help="ONNX Runtime execution providers, comma separated")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x32x32",
                   help="shape of an input (repeatable); NAME= may be left out for a single-input model")
    p.add_argument("--batch-sizes", default="1", help="comma separated; the first is the primary batch")
    p.add_argument("--warmup-s", type=float, default=0.2)
    p.add_argument("--min-iters", type=int, default=10)
    p.add_argument("--min-duration-s", type=float, default=3.0)
    p.add_argument("--max-iters", type=int)
    p.add_argument("--max-duration-s", type=float)
    p.add_argument("--eval-batch", type=int, help="batch for the accuracy pass (default: primary batch)")
    p.add_argument("--max-eval", type=int, help="evaluate on the first N samples only")
    p.add_argument("--power", choices=["auto", "on", "off"], default="auto",
                   help="tegrastats power sampling: auto = when tegrastats exists")
    p.add_argument("--tegrastats-interval-ms", type=int, default=100)
    p.add_argument("--trt-timing", choices=["host", "compute"], default="host")
    p.add_argument("--no-raw", action="store_true", help="do not keep raw per-iteration times")
    p.add_argument("--task", choices=["auto", "image-classification", "causal-lm"], default="auto",
                   help="auto: causal-lm when --data says so (benchmarks/board/lm_bench.py), else image-classification")
    p.add_argument("--gen-rounds", type=int, default=3, help="causal-lm: timed generations (median)")
    return p


class _Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _task(args: argparse.Namespace) -> str:
    if args.task != "auto":
        return args.task
    if args.data and str(args.data).endswith(".npz") and Path(args.data).is_file():
        with np.load(args.data, allow_pickle=False) as z:
            if "task" in z.files and str(z["task"]) == "causal-lm":
                return "causal-lm"
    return "image-classification"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The task's benchmark: a decoder LM (TTFT, tokens/s, perplexity, greedy agreement:
    benchmarks/board/lm_bench.py) or an image model (benchmarks/board/image_bench.py)."""
    if _task(args) == "causal-lm":
        return lm_bench.run(args)
    if args.backend and "image-classification" not in get_backend(args.backend).tasks:
        raise UserError(f"backend {args.backend} runs decoder LMs only: pass --data with the LM eval .npz "
                        "(--task causal-lm)")
    return image_bench.run(args)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        res = run(args)
    except UserError as e:
        log(f"error: {e}")
        mark_partial(Path(args.out), "failed", f"error: {e}")
        return 2
    except (_Interrupted, KeyboardInterrupt) as e:
        log(f"interrupted ({e or 'SIGINT'}); finished stages are in {partial_path(Path(args.out))}")
        mark_partial(Path(args.out), "interrupted", str(e) or "SIGINT")
        return 130
    except Exception as e:  # a crash in a runtime: keep the trace with the partial result
        log(traceback.format_exc())
        mark_partial(Path(args.out), "failed", f"{type(e).__name__}: {e}")
        return 3
    m = res["metrics"]
    if res.get("task") == "causal-lm":
        log(lm_bench.summary(res) + f" -> {args.out}")
        return 0
    log(
        "done: p50 {:.3f} ms, p90 {:.3f} ms, p99 {:.3f} ms at batch {}; peak RSS {:.1f} MB -> {}".format(
            m["latency_p50_ms"], m["latency_p90_ms"], m["latency_p99_ms"], m["batch_size"],
            m.get("peak_memory_mb") or float("nan"), args.out)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
