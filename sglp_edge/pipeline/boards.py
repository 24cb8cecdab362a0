"""The per-device stages of ``sglp-edge run`` (:mod:`sglp_edge.pipeline.run`): compile the exported
models for one device profile, and benchmark both on that device (a child process here, a board over
SSH, an emulated board), or, when the artifact must be built on a board that was not given, bundle
what the board needs and record every constraint as not measured.

Every stage takes the run's :class:`sglp_edge.tasks.context.TaskContext` (config, run folder, stage
runner, log, task). :func:`stage_compile` is the ONNX route a task's ``stage_compile`` may take
(images); :func:`stage_bench` is the same for every task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.board.atomic import atomic_path
from benchmarks.board.backends import get_backend
from benchmarks.board.diskspace import NEARLY_FULL, free_bytes, is_disk_full
from benchmarks.board.errors import EnvironmentFault, UserError
from exporters.compile import compile_model
from sglp_edge.pipeline.config import BoardSection, RunConfig
from sglp_edge.pipeline.stages import stable_hash
from sglp_edge.profiles.load import load_profile
from sglp_edge.profiles.schema import ConstraintResult
from sglp_edge.report.assemble import NEEDS_BOARD
from sglp_edge.targets.base import BenchJob
from sglp_edge.targets.factory import make_target
from sglp_edge.targets.bundle import make_bundle
from sglp_edge.targets.emulated import EMULATED_BENCH
from sglp_edge.tasks.context import TaskContext


def bench_overrides(cfg: RunConfig) -> dict[str, Any]:
    """The run's overrides of the profiles' bench settings (config ``bench:``)."""
    return dict(cfg.bench)


def stage_compile(ctx: TaskContext, board: BoardSection) -> dict[str, Any]:
    """Both exported ONNX models compiled for one device profile (:func:`exporters.compile.compile_model`)."""
    prof = load_profile(board.device)
    be = get_backend(prof.backend)
    # an artifact that must be built on the board (TensorRT engines are tied to its GPU and
    # TensorRT version) is only prepared here: ONNX, operator report, build command, shapes
    on_board = be.builds_on == "board"
    name = f"compile-{prof.backend}-{prof.precision}"
    onnx_hashes = {w: ctx.runner.file_hash("export", f"{w}.onnx") for w in ("original", "pruned")}
    run_dir = ctx.run_dir

    def fn(tmp: Path) -> dict[str, Any]:
        out = {}
        for which in ("original", "pruned"):
            man = compile_model(run_dir / "export" / f"{which}.onnx", prof.backend, prof.precision, tmp / which,
                                calib=run_dir / "eval_data" / "calib.npz",
                                eval_data=run_dir / "eval_data" / f"eval_{which}.npz",
                                eval_samples=500, progress=False, trtexec_only=on_board)
            out[which] = {k: man.get(k) for k in ("backend", "precision", "parity", "runtime", "seconds") if k in man}
            out[which]["builds_on"] = be.builds_on
        return out

    return ctx.runner.stage(name, ctx.inputs(name, backend=prof.backend, precision=prof.precision,
                                             on_board=on_board, onnx=onnx_hashes), fn) | {"stage": name}


def _artifact(run_dir: Path, compile_stage: str, which: str, backend: str) -> Path:
    """The file to benchmark: the board-built artifact when one was built, else what compile wrote."""
    be = get_backend(backend)
    d = run_dir / compile_stage / which
    if be.folder_artifact:  # the folder is the artifact (onnxruntime-genai: model.onnx + genai_config.json)
        return d
    if be.board_artifact and (d / be.board_artifact).is_file():
        return d / be.board_artifact
    return d / be.artifact


def _artifact_hash(ctx: TaskContext, compile_stage: str, art: Path) -> str:
    """The recorded hash of an artifact file, or for a folder artifact one hash over all its files."""
    rel = str(art.relative_to(ctx.run_dir / compile_stage))
    if not art.is_dir():
        return ctx.runner.file_hash(compile_stage, rel)
    files = ctx.runner.manifest["stages"][compile_stage]["files"]
    return stable_hash({k: v for k, v in files.items() if k.startswith(rel + "/")})


def _where(board: BoardSection, prof: Any) -> tuple[str | None, str | None, str, str]:
    """The board's host, its emulation, the label of the target and the bench stage's name."""
    host = board.host or (prof.ssh.host if (prof.ssh and not board.emulate) else None)
    emulate = board.emulate or (None if host else prof.emulate)
    label = board.device + (f"@{host}" if host else "") + ("@emulated" if emulate else "")
    return host, emulate, label, f"bench-{label}".replace("/", "_").replace("@", "_at_")


def stage_bench(ctx: TaskContext, board: BoardSection, compile_stage: str) -> dict[str, Any]:
    """Both compiled models benchmarked on one device, or bundled for a board that was not given."""
    prof = load_profile(board.device)
    be = get_backend(prof.backend)
    host, emulate, label, name = _where(board, prof)
    arts = {w: _artifact(ctx.run_dir, compile_stage, w, prof.backend) for w in ("original", "pruned")}
    inputs = ctx.inputs(name, profile=prof.model_dump(mode="json"), host=board.model_dump(),
                        bench=bench_overrides(ctx.cfg),
                        artifacts={w: _artifact_hash(ctx, compile_stage, a) for w, a in arts.items()})
    head = {"device": prof.name, "backend": prof.backend, "precision": prof.precision, "threads": prof.threads}
    if be.builds_on == "board" and not host:
        if emulate:
            raise UserError(f"{prof.name}: the {prof.backend} artifact is built on the board and has no "
                            "emulated runtime here; drop --emulate and give --host user@board")
        return _needs_board(ctx, prof, compile_stage, name, inputs, head, arts)
    ssh = {"port": board.port, "identity": board.identity, "known_hosts": board.known_hosts,
           "remote_python": board.remote_python}
    target = make_target(prof, host=host, emulate=emulate, label=label, ssh=ssh if host else None)
    if target.emulated:
        target.progress = ctx.log
        target.prepare(prof.backend)  # once, cached outside the run folder
    run_dir, overrides = ctx.run_dir, bench_overrides(ctx.cfg)

    def fn(tmp: Path) -> dict[str, Any]:
        results = {}
        for which in ("original", "pruned"):
            data = run_dir / "eval_data" / f"eval_{which}.npz"
            if target.emulated and ctx.task.modality == "image":  # a subset (emulation is slow), with the
                # baseline on the same images; an LM's perplexity blocks are capped by the harness (--max-eval)
                data = _eval_subset(run_dir, which, EMULATED_BENCH["max_eval"] if overrides.get(
                    "max_eval") is None else int(overrides["max_eval"]))
            run = target.bench(BenchJob(artifact=arts[which], data=data,
                                        profile=prof, out_dir=tmp / which, overrides=dict(overrides),
                                        label=f"{label}:{which}",
                                        bundle_path=run_dir / ".work" / f"bundle-{which}.tar.gz"))
            if not run.ok:
                raise _bench_failure(run, f"benchmark of the {which} model on {label} failed: {run.error} "
                                          f"(logs in {run_dir / name / which})", run_dir)
            results[which] = run.result or {}
        m = dict(results["pruned"].get("metrics", {}))
        m.update(ctx.task.derived_metrics(results))  # e.g. perplexity increase over the original
        cons = [c.model_dump() for c in target.constraints(prof, m)]
        return {**head, "constraints": cons, "measured": True, "target": results["pruned"].get("target"),
                "metrics": {w: r.get("metrics", {}) for w, r in results.items()}}

    return ctx.runner.stage(name, inputs, fn) | {"stage": name}


def _eval_subset(run_dir: Path, which: str, n: int) -> Path:
    """The first ``n`` held-out samples of ``eval_<which>.npz``, with ``baseline_top1`` (the unpruned
    model's PyTorch top-1) recomputed on those same samples, so the accuracy drop compares like with like."""
    with np.load(run_dir / "eval_data" / f"eval_{which}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    with np.load(run_dir / "eval_data" / "eval_original.npz") as z:
        base = z["logits"][:n].argmax(1) == z["y"][:n]
    sub = {k: (v[:n] if v.ndim else v) for k, v in arrays.items()}
    sub["baseline_top1"] = np.float64(base.mean() * 100.0)
    dest = run_dir / ".work" / f"eval_{which}_first{n}.npz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **sub)
    return dest


def _needs_board(ctx: TaskContext, prof: Any, compile_stage: str, name: str, inputs: dict[str, Any],
                 head: dict[str, Any], arts: dict[str, Path]) -> dict[str, Any]:
    """No board given for an artifact built on the board: bundle what the board needs (harness,
    prepared ONNX, eval data) into the run folder and record every constraint as not measured."""
    run_dir = ctx.run_dir

    def fn(tmp: Path) -> dict[str, Any]:
        bundles = {}
        for which in ("original", "pruned"):
            b = make_bundle(arts[which], run_dir / "eval_data" / f"eval_{which}.npz",
                            tmp / f"bundle-{which}.tar.gz")
            bundles[which] = {"path": f"{name}/bundle-{which}.tar.gz", "sha256": b.sha256, "bytes": b.size_bytes}
        cons = [ConstraintResult(metric=c.metric, op=c.op, limit=c.limit, measured=None, passed=None,
                                 note=NEEDS_BOARD).model_dump() for c in prof.constraints]
        return {**head, "constraints": cons, "measured": False, "needs_board": True, "bundles": bundles,
                "target": {"kind": "none", "where": None, "emulated": False, "note": NEEDS_BOARD},
                "board_files": {"trtexec_command": f"{compile_stage}/pruned/trtexec_build.sh",
                                "operator_report": f"{compile_stage}/pruned/trt_op_check.json",
                                "onnx": str(arts["pruned"].relative_to(run_dir))}}

    return ctx.runner.stage(name, inputs, fn) | {"stage": name}


def _bench_failure(run: Any, msg: str, run_dir: Path) -> UserError:
    """A failed benchmark as one line: exit 4 when the environment caused it (the board stopped
    answering, a timeout, the disk under the run folder is full), 2 otherwise."""
    full = is_disk_full(RuntimeError(run.error or ""), run_dir) or free_bytes(run_dir) < NEARLY_FULL
    if full:
        return EnvironmentFault(f"out of disk space under {run_dir}: {msg}; free space there and re-run (finished "
                                "stages are kept)")
    return EnvironmentFault(msg) if run.environment else UserError(msg)
