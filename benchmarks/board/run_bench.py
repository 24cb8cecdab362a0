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
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file: the bundle (or repository) root holds exporters/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.board.trt_build import build_trt_engine  # noqa: E402,F401
from benchmarks.board.backends import NAMES as BACKEND_NAMES  # noqa: E402

SCHEMA = "sglp-edge.bench/1"
PROGRESS_PREFIX = "@@sglp-progress "
HANG_ENV = "SGLP_EDGE_BENCH_TEST_HANG_S"


def _progress(stage: str, done: int = 0, total: int = 0, **extra: Any) -> None:
    msg = {"stage": stage, "done": done, "total": total, **extra}
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.json") if out.suffix != ".json" else out.with_suffix(".partial.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.board.run_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="OpenVINO .xml, ONNX .onnx or TensorRT .engine")
    p.add_argument("--backend", choices=list(BACKEND_NAMES),
                   help="default: from the file suffix (onnxruntime-genai: causal-lm only, benchmarks/board/lm_bench.py)")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--data", help="evaluation .npz (see benchmarks/board/accuracy.py for its keys)")
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


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    from benchmarks.board.runner_base import parse_shape
    from benchmarks.board.errors import UserError

    shapes: dict[str, list[int]] = {}
    for it in items:
        name, sep, dims = it.rpartition("=")
        if not sep:
            name, dims = "", it
        if name in shapes:
            raise UserError(f"--input-shape given twice for {name or 'the input'}")
        shapes[name] = parse_shape(dims)
    return shapes


def _parse_batches(text: str) -> list[int]:
    from benchmarks.board.errors import UserError

    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be integers separated by commas, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise UserError(f"--batch-sizes must be positive integers, got {text!r}")
    return list(dict.fromkeys(out))


class _Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _task(args: argparse.Namespace) -> str:
    if args.task != "auto":
        return args.task
    if args.data and str(args.data).endswith(".npz") and Path(args.data).is_file():
        import numpy as np

        with np.load(args.data, allow_pickle=False) as z:
            if "task" in z.files and str(z["task"]) == "causal-lm":
                return "causal-lm"
    return "image-classification"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if _task(args) == "causal-lm":  # decoder LM with KV cache: TTFT, tokens/s, perplexity, greedy agreement
        import benchmarks.board.lm_bench as lm_bench

        return lm_bench.run(args)
    if args.backend == "onnxruntime-genai":
        from benchmarks.board.errors import UserError

        raise UserError("backend onnxruntime-genai runs decoder LMs only: pass --data with the LM eval .npz "
                        "(--task causal-lm)")
    import benchmarks.board.accuracy as acc
    from benchmarks.board.harness import MeasureConfig, capture_env, measure, now_iso, peak_memory
    from benchmarks.board.backends import backend_for_file
    from benchmarks.board.runner_base import UnsupportedBatch, artifact_files, random_feeds
    from benchmarks.board.runners import open_runner
    from benchmarks.board.tegrastats import TegrastatsSampler, jetson_peak_memory, nvmap_client_mb, summarize
    from benchmarks.board.atomic import atomic_write_json, sha256_file
    from benchmarks.board.errors import UserError

    out = Path(args.out)
    part = partial_path(out)
    artifact = Path(args.artifact)
    if not artifact.exists():
        raise UserError(f"artifact not found: {artifact}")
    if args.data and not Path(args.data).exists():
        raise UserError(f"eval data not found: {args.data}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    backend = args.backend or backend_for_file(artifact)
    batches = _parse_batches(args.batch_sizes)
    shapes = _parse_shapes(args.input_shape)
    cfg = MeasureConfig(args.warmup_s, args.min_iters, args.min_duration_s, args.max_iters, args.max_duration_s).validate()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None

    engine_build = None
    if backend == "tensorrt" and artifact.suffix.lower() == ".onnx":
        _progress("build", 0, 1)
        engine_build = build_trt_engine(artifact, args.precision, batches, shapes)
        artifact = Path(engine_build["engine"])
        _progress("build", 1, 1)
    files = artifact_files(artifact, backend)
    size = sum(f.stat().st_size for f in files)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "running",
        "stage": "start",
        "pid": os.getpid(),
        "started_at": now_iso(),
        "artifact": {
            "name": artifact.name,
            "files": [f.name for f in files],
            "size_bytes": size,
            "size_mb": size / float(1 << 20),
            "sha256": sha256_file(artifact),
        },
        "backend": backend,
        "engine_build": engine_build,
        "settings": {
            "threads": args.threads,
            "streams": args.streams,
            "precision": args.precision,
            "device": args.device,
            "providers": providers,
            "input_shapes": shapes or None,
            "batch_sizes": batches,
            "measure": asdict(cfg),
            "eval_batch": args.eval_batch,
            "max_eval": args.max_eval,
            "power": args.power,
        },
        "latency": [],
        "skipped_batches": [],
        "memory": {"at_start": peak_memory()},
        "power": None,
        "accuracy": None,
        "metrics": {"model_size_mb": size / float(1 << 20)},
    }

    def save_partial(stage: str) -> None:
        result["stage"] = stage
        atomic_write_json(part, result)

    save_partial("start")
    # on a Jetson, tegrastats starts before the model loads: the board RAM then is the baseline for
    # the GPU (nvmap) memory the model adds, which the process RSS does not hold
    sampler: Optional[TegrastatsSampler] = None
    ram_before = None
    if args.power != "off":
        sampler = TegrastatsSampler(interval_ms=args.tegrastats_interval_ms)
        if not sampler.available:
            if args.power == "on":
                raise UserError("--power on but tegrastats is not on PATH (it ships with JetPack on Jetson boards)")
            result["power"] = {"available": False, "reason": sampler.error}
            sampler = None
        else:
            sampler.start()
            time.sleep(max(0.3, 2.5 * args.tegrastats_interval_ms / 1000.0))  # first lines
            ram_before = next((s.ram_used_mb for s in reversed(sampler.samples) if s.ram_used_mb is not None), None)
    _progress("load", 0, 1)
    try:
        runner = open_runner(backend, artifact, threads=args.threads, streams=args.streams, precision=args.precision,
                             device=args.device, providers=providers, input_shapes=shapes, trt_timing=args.trt_timing)
    except BaseException:
        if sampler is not None:
            sampler.stop()
        raise
    try:
        try:
            result["runtime"] = runner.info()
            result["env"] = capture_env()
            result["memory"]["after_load"] = peak_memory()
            save_partial("loaded")
            _progress("load", 1, 1)

            for i, b in enumerate(batches):
                _progress("latency", i, len(batches), batch_size=b)
                try:
                    runner.set_batch(b)
                except UnsupportedBatch as e:
                    if i == 0:
                        raise UserError(f"the primary batch size {b} cannot run: {e}") from None
                    result["skipped_batches"].append({"batch_size": b, "reason": str(e)})
                    continue
                fn = runner.bind(random_feeds(runner.inputs, seed=b))
                t0 = time.monotonic()
                m = measure(fn, cfg, sync=runner.sync, batch_size=b)
                t1 = time.monotonic()
                entry = m.to_dict(keep_raw=not args.no_raw)
                entry["input_shapes"] = {s.name: s.shape for s in runner.inputs}
                result["latency"].append(entry)
                if i == 0:
                    mem = peak_memory()
                    result["memory"]["after_primary_latency"] = mem
                    st = m.stats()
                    result["metrics"].update(
                        batch_size=b,
                        latency_p50_ms=st["p50_ms"],
                        latency_p90_ms=st["p90_ms"],
                        latency_p99_ms=st["p99_ms"],
                        latency_mean_ms=st["mean_ms"],
                        throughput_items_per_s=st["throughput_items_per_s"],
                        peak_memory_mb=mem["peak_rss_mb"],
                    )
                    if backend == "tensorrt" and (sampler is not None or nvmap_client_mb(os.getpid()) is not None):
                        jm = jetson_peak_memory(mem["peak_rss_mb"], result["memory"]["at_start"].get("rss_now_mb"),
                                                ram_before, sampler.samples if sampler is not None else [],
                                                nvmap_client_mb(os.getpid()))
                        result["memory"]["jetson"] = jm
                        if jm.get("peak_memory_mb") is not None:
                            result["metrics"]["peak_memory_mb"] = jm["peak_memory_mb"]
                    if sampler is not None:
                        # the timed window only; tegrastats lines are read as they arrive
                        window = sampler.samples_between(t0, t1)
                        pw = summarize(window, duration_s=m.wall_s, inferences=len(m.times_ns))
                        pw["available"] = True
                        pw["interval_ms"] = args.tegrastats_interval_ms
                        pw["raw_lines"] = [l for s, l in zip(sampler.samples, sampler.raw_lines)
                                            if s.t_monotonic is not None and t0 <= s.t_monotonic <= t1]
                        result["power"] = pw
                        if "energy_mj" in pw:
                            result["metrics"]["energy_mj"] = pw["energy_mj"]
                            result["metrics"]["mean_power_mw"] = pw["mean_power_mw"]
                save_partial(f"latency_b{b}")
                _progress("latency", i + 1, len(batches), batch_size=b)
        finally:
            if sampler is not None:
                sampler.stop()

        hang = os.environ.get(HANG_ENV)
        if hang:
            _log(f"[test hook] sleeping {hang} s after the latency stage")
            time.sleep(float(hang))

        if args.data:
            data = acc.load_eval_npz(args.data, max_samples=args.max_eval)
            eb = args.eval_batch or batches[0]
            try:
                runner.set_batch(eb)
            except UnsupportedBatch as e:
                raise UserError(f"cannot evaluate at batch {eb}: {e}; pass --eval-batch {batches[0]}") from None
            total = -(-data.n // eb)
            _progress("accuracy", 0, data.n)
            step = max(1, total // 50)
            counter = {"k": 0}

            def prog(done: int, n: int) -> None:
                counter["k"] += 1
                if counter["k"] % step == 0 or done == n:
                    _progress("accuracy", done, n)

            res = acc.evaluate(runner, data, batch_size=eb, precision=args.precision, progress=prog)
            result["accuracy"] = res
            for k in ("top1_pct", "accuracy_drop_pct", "perplexity", "ppl_increase_pct"):
                if k in res:
                    result["metrics"][k] = res[k]
            if "agreement" in res:
                result["metrics"]["top1_agreement_pct"] = res["agreement"]["top1_agreement_pct"]
            save_partial("accuracy")
        result["memory"]["at_end"] = peak_memory()
    finally:
        runner.close()

    result["status"] = "complete"
    result["stage"] = "done"
    result["finished_at"] = now_iso()
    atomic_write_json(out, result)
    try:
        part.unlink()
    except FileNotFoundError:
        pass
    _progress("done", 1, 1)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks.board.errors import UserError

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        res = run(args)
    except UserError as e:
        _log(f"error: {e}")
        _mark_partial(args, "failed", f"error: {e}")
        return 2
    except (_Interrupted, KeyboardInterrupt) as e:
        _log(f"interrupted ({e or 'SIGINT'}); finished stages are in {partial_path(Path(args.out))}")
        _mark_partial(args, "interrupted", str(e) or "SIGINT")
        return 130
    except Exception as e:  # a crash in a runtime: keep the trace with the partial result
        _log(traceback.format_exc())
        _mark_partial(args, "failed", f"{type(e).__name__}: {e}")
        return 3
    m = res["metrics"]
    if res.get("task") == "causal-lm":
        from benchmarks.board.lm_bench import summary

        _log(summary(res) + f" -> {args.out}")
        return 0
    _log(
        "done: p50 {:.3f} ms, p90 {:.3f} ms, p99 {:.3f} ms at batch {}; peak RSS {:.1f} MB -> {}".format(
            m["latency_p50_ms"], m["latency_p90_ms"], m["latency_p99_ms"], m["batch_size"],
            m.get("peak_memory_mb") or float("nan"), args.out)
    )
    return 0


def _mark_partial(args: argparse.Namespace, status: str, error: str) -> None:
    from benchmarks.board.atomic import atomic_write_json

    part = partial_path(Path(args.out))
    try:
        doc = json.loads(part.read_text())
    except (OSError, ValueError):
        return
    doc["status"] = status
    doc["error"] = error
    try:
        atomic_write_json(part, doc)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
