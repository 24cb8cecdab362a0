"""The image-model benchmark on the board, in named steps (numpy + the backend's runtime; no torch).

:func:`run`: check the request (and build the runnable artifact where the backend builds it on the
board, e.g. a TensorRT engine from an ``.onnx``), start power sampling, open the runner, measure
latency at each batch size, evaluate accuracy on ``--data``, write the result. Every finished step
is saved to ``<out>.partial.json`` (benchmarks/board/run_bench.py describes the files and flags).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.board.accuracy import evaluate
from benchmarks.board.atomic import atomic_write_json, sha256_file
from benchmarks.board.backends import backend_for_file, get_backend, resolve
from benchmarks.board.bench_io import log, partial_path, progress
from benchmarks.board.calib import load_eval_npz
from benchmarks.board.errors import UserError
from benchmarks.board.harness import Measurement, MeasureConfig, capture_env, measure, now_iso, peak_memory
from benchmarks.board.runner_base import Runner, UnsupportedBatch, artifact_files, parse_shape, random_feeds
from benchmarks.board.runners import open_runner
from benchmarks.board.tegrastats import TegrastatsSampler, jetson_peak_memory, nvmap_client_mb, summarize

SCHEMA = "sglp-edge.bench/1"
HANG_ENV = "SGLP_EDGE_BENCH_TEST_HANG_S"


@dataclass
class Request:
    """The checked request: what runs, at which batch sizes and shapes, measured how."""

    out: Path
    artifact: Path  # what the runner opens (the engine built here, for a board-built backend)
    backend: str
    batches: List[int]
    shapes: Dict[str, List[int]]
    cfg: MeasureConfig
    providers: Optional[List[str]]
    engine_build: Optional[Dict[str, Any]] = None


def parse_shapes(items: List[str]) -> Dict[str, List[int]]:
    shapes: Dict[str, List[int]] = {}
    for it in items:
        name, sep, dims = it.rpartition("=")
        if not sep:
            name, dims = "", it
        if name in shapes:
            raise UserError(f"--input-shape given twice for {name or 'the input'}")
        shapes[name] = parse_shape(dims)
    return shapes


def parse_batches(text: str) -> List[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be integers separated by commas, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise UserError(f"--batch-sizes must be positive integers, got {text!r}")
    return list(dict.fromkeys(out))


def check_request(args: argparse.Namespace) -> Request:
    """The arguments checked; a backend built on the board (the registry's ``board_build``) builds its
    artifact from an ``.onnx`` here."""
    artifact = Path(args.artifact)
    if not artifact.exists():
        raise UserError(f"artifact not found: {artifact}")
    if args.data and not Path(args.data).exists():
        raise UserError(f"eval data not found: {args.data}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    backend = args.backend or backend_for_file(artifact)
    req = Request(out=Path(args.out), artifact=artifact, backend=backend, batches=parse_batches(args.batch_sizes),
                  shapes=parse_shapes(args.input_shape),
                  cfg=MeasureConfig(args.warmup_s, args.min_iters, args.min_duration_s, args.max_iters,
                                    args.max_duration_s).validate(),
                  providers=[p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None)
    spec = get_backend(backend)
    if spec.board_build and artifact.suffix.lower() == ".onnx":
        progress("build", 0, 1)
        req.engine_build = resolve(spec.board_build)(artifact, args.precision, req.batches, req.shapes)
        req.artifact = Path(req.engine_build["engine"])
        progress("build", 1, 1)
    return req


def new_result(args: argparse.Namespace, req: Request) -> Dict[str, Any]:
    """The result document as it starts: artifact, settings, empty stages."""
    files = artifact_files(req.artifact, req.backend)
    size = sum(f.stat().st_size for f in files)
    return {
        "schema": SCHEMA,
        "status": "running",
        "stage": "start",
        "pid": os.getpid(),
        "started_at": now_iso(),
        "artifact": {
            "name": req.artifact.name,
            "files": [f.name for f in files],
            "size_bytes": size,
            "size_mb": size / float(1 << 20),
            "sha256": sha256_file(req.artifact),
        },
        "backend": req.backend,
        "engine_build": req.engine_build,
        "settings": {
            "threads": args.threads,
            "streams": args.streams,
            "precision": args.precision,
            "device": args.device,
            "providers": req.providers,
            "input_shapes": req.shapes or None,
            "batch_sizes": req.batches,
            "measure": asdict(req.cfg),
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


def save_partial(result: Dict[str, Any], req: Request, stage: str) -> None:
    result["stage"] = stage
    atomic_write_json(partial_path(req.out), result)


def start_power(args: argparse.Namespace, result: Dict[str, Any]) -> Tuple[Optional[TegrastatsSampler], Optional[float]]:
    """On a Jetson, tegrastats starts before the model loads: the board RAM then is the baseline for
    the GPU (nvmap) memory the model adds, which the process RSS does not hold. Returns the sampler
    (None: no power sampling) and that baseline."""
    if args.power == "off":
        return None, None
    sampler = TegrastatsSampler(interval_ms=args.tegrastats_interval_ms)
    if not sampler.available:
        if args.power == "on":
            raise UserError("--power on but tegrastats is not on PATH (it ships with JetPack on Jetson boards)")
        result["power"] = {"available": False, "reason": sampler.error}
        return None, None
    sampler.start()
    time.sleep(max(0.3, 2.5 * args.tegrastats_interval_ms / 1000.0))  # first lines
    ram_before = next((s.ram_used_mb for s in reversed(sampler.samples) if s.ram_used_mb is not None), None)
    return sampler, ram_before


def open_for(args: argparse.Namespace, req: Request, sampler: Optional[TegrastatsSampler]) -> Runner:
    progress("load", 0, 1)
    try:
        return open_runner(req.backend, req.artifact, threads=args.threads, streams=args.streams,
                           precision=args.precision, device=args.device, providers=req.providers,
                           input_shapes=req.shapes, trt_timing=args.trt_timing)
    except BaseException:
        if sampler is not None:
            sampler.stop()
        raise


def primary_metrics(args: argparse.Namespace, req: Request, result: Dict[str, Any], m: Measurement, b: int,
                    sampler: Optional[TegrastatsSampler], ram_before: Optional[float], t0: float, t1: float) -> None:
    """The primary batch's figures become the ``metrics``: latency, memory, power and energy."""
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
    if get_backend(req.backend).gpu_memory and (sampler is not None or nvmap_client_mb(os.getpid()) is not None):
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


def latency_stage(args: argparse.Namespace, req: Request, runner: Runner, result: Dict[str, Any],
                  sampler: Optional[TegrastatsSampler], ram_before: Optional[float]) -> None:
    """Latency at each batch size (a batch the artifact cannot run is skipped, unless it is the primary one)."""
    for i, b in enumerate(req.batches):
        progress("latency", i, len(req.batches), batch_size=b)
        try:
            runner.set_batch(b)
        except UnsupportedBatch as e:
            if i == 0:
                raise UserError(f"the primary batch size {b} cannot run: {e}") from None
            result["skipped_batches"].append({"batch_size": b, "reason": str(e)})
            continue
        fn = runner.bind(random_feeds(runner.inputs, seed=b))
        t0 = time.monotonic()
        m = measure(fn, req.cfg, sync=runner.sync, batch_size=b)
        t1 = time.monotonic()
        entry = m.to_dict(keep_raw=not args.no_raw)
        entry["input_shapes"] = {s.name: s.shape for s in runner.inputs}
        result["latency"].append(entry)
        if i == 0:
            primary_metrics(args, req, result, m, b, sampler, ram_before, t0, t1)
        save_partial(result, req, f"latency_b{b}")
        progress("latency", i + 1, len(req.batches), batch_size=b)


def hang_if_testing() -> None:
    """The test hook (not a user option): sleep after the latency stage, as a board dying mid-run."""
    hang = os.environ.get(HANG_ENV)
    if hang:
        log(f"[test hook] sleeping {hang} s after the latency stage")
        time.sleep(float(hang))


def accuracy_stage(args: argparse.Namespace, req: Request, runner: Runner, result: Dict[str, Any]) -> None:
    """Accuracy of the artifact on ``--data`` and its agreement with the stored PyTorch outputs."""
    data = load_eval_npz(args.data, max_samples=args.max_eval)
    eb = args.eval_batch or req.batches[0]
    try:
        runner.set_batch(eb)
    except UnsupportedBatch as e:
        raise UserError(f"cannot evaluate at batch {eb}: {e}; pass --eval-batch {req.batches[0]}") from None
    total = -(-data.n // eb)
    progress("accuracy", 0, data.n)
    step = max(1, total // 50)
    counter = {"k": 0}

    def prog(done: int, n: int) -> None:
        counter["k"] += 1
        if counter["k"] % step == 0 or done == n:
            progress("accuracy", done, n)

    res = evaluate(runner, data, batch_size=eb, precision=args.precision, progress=prog)
    result["accuracy"] = res
    for k in ("top1_pct", "accuracy_drop_pct", "perplexity", "ppl_increase_pct"):
        if k in res:
            result["metrics"][k] = res[k]
    if "agreement" in res:
        result["metrics"]["top1_agreement_pct"] = res["agreement"]["top1_agreement_pct"]
    save_partial(result, req, "accuracy")


def finish(req: Request, result: Dict[str, Any]) -> None:
    """The complete result written atomically to ``--out``; the partial file removed."""
    result["status"] = "complete"
    result["stage"] = "done"
    result["finished_at"] = now_iso()
    atomic_write_json(req.out, result)
    try:
        partial_path(req.out).unlink()
    except FileNotFoundError:
        pass
    progress("done", 1, 1)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The whole image benchmark; ``args`` as built by benchmarks.board.run_bench.build_parser."""
    req = check_request(args)
    result = new_result(args, req)
    save_partial(result, req, "start")
    sampler, ram_before = start_power(args, result)
    runner = open_for(args, req, sampler)
    try:
        try:
            result["runtime"] = runner.info()
            result["env"] = capture_env()
            result["memory"]["after_load"] = peak_memory()
            save_partial(result, req, "loaded")
            progress("load", 1, 1)
            latency_stage(args, req, runner, result, sampler, ram_before)
        finally:
            if sampler is not None:
                sampler.stop()
        hang_if_testing()
        if args.data:
            accuracy_stage(args, req, runner, result)
        result["memory"]["at_end"] = peak_memory()
    finally:
        runner.close()
    finish(req, result)
    return result
