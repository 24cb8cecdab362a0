"""``sglp-edge run``: prune -> fine-tune -> export -> compile -> benchmark -> report, for one or
more device profiles, in one run folder.

Each stage is a sub-folder written atomically and recorded in ``manifest.json`` with the hash of
its inputs and of every file it wrote (see :mod:`sglp_edge.pipeline.stages`): a re-run skips finished
stages, a killed run resumes where it stopped, and a changed setting re-runs only the stages
downstream of it. The fine-tune keeps its own per-epoch checkpoints under ``.work/`` so even an
interrupted fine-tune resumes instead of starting over.

Benchmarks run in a child process on this machine (``local-*`` profiles), or on a board over SSH
when the profile (or the config) names a host.
The config schema is in :mod:`sglp_edge.pipeline.config`; what differs by task (images, causal LMs) is in
:mod:`sglp_edge.tasks`, one file per task, each given a :class:`sglp_edge.tasks.context.TaskContext`
(never the pipeline). The benchmark stage (the same for every task) is in :mod:`sglp_edge.pipeline.boards`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sglp_edge.budget.run import decode_precision, prune_settings, search_html, search_report, verify_final
from sglp_edge.pipeline.boards import bench_overrides, stage_bench
from sglp_edge.pipeline.config import RunConfig, apply_task_defaults
from sglp_edge.pipeline.stages import StageRunner
from sglp_edge.profiles.load import load_profile
from sglp_edge.report.render import write_report
from sglp_edge.tasks import get_task
from sglp_edge.tasks.context import TaskContext

#: ``sglp-edge run`` exit status: every target that could be measured here was, none failed, and at
#: least one target needs its board to finish (its artifact is built there): run the printed command
EXIT_FINISH_ON_BOARD = 3


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


@contextmanager
def peak_rss(record: dict[str, Any], stage: str, log: Any = None) -> Iterator[None]:
    """Peak resident memory of this process during one stage (MiB): Linux's VmHWM, reset at the
    stage's start through /proc/self/clear_refs. Where that cannot be reset, the figure is the
    process peak so far (recorded as such)."""
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        pass
    try:
        yield
    finally:
        mb = _status_mb("VmHWM")
        if mb is not None:
            record[stage] = round(mb, 1) if reset else {"process_peak_so_far_mb": round(mb, 1)}
            if log:
                log(f"peak RSS during {stage}: {mb:.0f} MiB" + ("" if reset else " (process peak so far)"))


class Pipeline:
    """One run: the shared stages (prune, fine-tune, benchmark) and the task's (eval data, export,
    compile, report), in order, in one run folder."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, force: bool = False, log=print):
        self.cfg, self.run_dir, self.log = apply_task_defaults(cfg), Path(run_dir), log
        self.task = get_task(self.cfg.task)
        self._new_dir = not self.run_dir.exists()
        self.runner = StageRunner(self.run_dir, force=force, log=log)
        self.ctx = TaskContext(self.cfg, self.run_dir, self.runner, self.task, log=log)
        self.peak_rss_mb: dict[str, Any] = {}

    # ---- stages -------------------------------------------------------------------------------
    def stage_prune(self) -> dict[str, Any]:
        from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job  # heavy: torch

        p = self.cfg.prune
        more: dict[str, Any] = {}
        extra_inputs: dict[str, Any] = {}
        if p.keep == "auto":  # a latency budget on the first device (sglp_edge.budget)
            more, extra_inputs = prune_settings(self.cfg, bench_overrides(self.cfg), self.log)

        def fn(tmp: Path) -> dict[str, Any]:
            job = PruneJob(model=self.cfg.model, out=tmp / "out", data=self.cfg.data,
                           data_root=Path(self.cfg.data_root) if self.cfg.data_root else None, seed=self.cfg.seed,
                           **p.model_dump(), **more)  # every prune: field of the config is a PruneJob field
            res = run_prune_job(job, loaded=self.ctx.loaded, show_progress=True)
            for f in (tmp / "out").iterdir():  # flatten: prune/{model,plan.json,cka_heatmap.png}
                f.rename(tmp / f.name)
            (tmp / "out").rmdir()
            pl = res.plan
            out = {"removed": pl.removed, "kept": pl.kept, "units": f"{pl.n_units_before}->{pl.n_units_after}",
                   "macs_reduction": pl.macs_reduction, "evaluations": pl.evaluations}
            if pl.search:
                out["latency_search"] = {k: pl.search[k] for k in ("device", "budget_ms", "margin", "rounds", "chosen")}
            return out

        return self.runner.stage("prune", self.ctx.inputs("prune", prune=p.model_dump(), **extra_inputs), fn)

    def stage_finetune(self) -> dict[str, Any]:
        from sglp_edge.models.registry import load_model  # heavy: torch
        from sglp_edge.train.finetune import finetune  # heavy: torch

        f = self.cfg.finetune
        prune_hash = self.runner.file_hash("prune", "model/model.safetensors")

        def fn(tmp: Path) -> dict[str, Any]:
            student = load_model(str(self.run_dir / "prune" / "model"), trust_builder=self.cfg.trust_builder)
            teacher = self.ctx.loaded
            work = self.run_dir / ".work" / "finetune"
            work.mkdir(parents=True, exist_ok=True)
            # the state file is keyed by the pruned weights and the fine-tune settings: a new prune or a
            # changed fine-tune starts afresh, and an older state stays on disk for its own settings
            key = hashlib.sha256(json.dumps([prune_hash, f.model_dump()], sort_keys=True, default=str).encode())
            fcfg = self._finetune_config(student, teacher, work / f"state-{key.hexdigest()[:12]}.pt")
            res = finetune(student.model, teacher.model, student.adapter, self.ctx.data, fcfg)
            self.task.save_model(self.ctx, student, res.model, tmp / "model", {"finetune": res.summary()})
            return res.summary()

        if not f.enabled:
            return {"skipped": "finetune.enabled is false"}
        return self.runner.stage("finetune", self.ctx.inputs("finetune", finetune=f.model_dump(), pruned=prune_hash), fn)

    def _finetune_config(self, student: Any, teacher: Any, state: Path) -> Any:
        """The fine-tune's settings (a FinetuneConfig) from the config's ``finetune:`` section; with
        ``feature_kd``, the map of the student's units to the teacher's."""
        from sglp_edge.train.finetune import FinetuneConfig  # heavy: torch
        from sglp_edge.train.kd import kept_unit_map  # heavy: torch

        f = self.cfg.finetune
        fmap = None
        if f.feature_kd > 0:
            prior = (teacher.meta or {}).get("removal_rounds") or []
            fmap = kept_unit_map(teacher.model, teacher.adapter, student.meta["removal_rounds"][len(prior):])
        return FinetuneConfig(epochs=f.epochs, steps=f.steps, minutes=f.minutes, batch_size=f.batch_size, lr=f.lr,
                              optimizer=f.optimizer, weight_decay=f.weight_decay, val_samples=f.val_samples,
                              test_samples=f.test_samples,
                              alpha=f.alpha, temperature=f.temperature, feature_weight=f.feature_kd,
                              feature_map=fmap, seed=self.cfg.seed, state_path=str(state))

    # ---- whole run ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Cheap checks before any stage: every device profile, and the data against the model
        (shape, labels, declared units) on two samples."""
        from sglp_edge.pipeline.calibration import check_fit  # heavy: torch

        for board in self.cfg.boards():
            load_profile(board.device)
        loaded = self.ctx.loaded
        if loaded.adapter.modality == "image":
            data = self.ctx.data
            batch = data.calibration_batches(1, 2, seed=self.cfg.seed)[0]
            check_fit(loaded, batch, data=self.cfg.data, num_classes=data.num_classes)

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.runner.close()

    def _validate_or_clean(self) -> None:
        """:meth:`validate`; a refused run leaves no empty run folder behind."""
        try:
            self.validate()
        except BaseException:
            if self._new_dir and {p.name for p in self.run_dir.iterdir()} <= {".sglp-edge", ".lock"}:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._validate_or_clean()
        report = self._run_stages()
        if self.cfg.prune.keep == "auto":
            self._add_latency_search(report)
        report["wall_s"] = time.perf_counter() - t0
        report["task"] = self.task.name
        rss = self.peak_rss_mb
        report["peak_rss_mb"] = {"host_stages": dict(rss), "bench_children": {
            f"{t['device']}:{w}": (t["results"].get(w) or {}).get("peak_rss_mb") for t in report.get("targets", [])
            for w in ("original", "pruned")}}
        self.log("peak RSS per stage (MiB, this process): " + ", ".join(f"{k} {v}" for k, v in rss.items()))
        write_report(report, self.run_dir)
        return report

    def _run_stages(self) -> dict[str, Any]:
        """Every stage in order, each under its peak-RSS record; the task's report of them."""
        task, ctx, rss = self.task, self.ctx, self.peak_rss_mb
        with peak_rss(rss, "prune", self.log):
            prune = self.stage_prune()
        with peak_rss(rss, "finetune", self.log):
            ft = self.stage_finetune()
        with peak_rss(rss, "eval_data", self.log):
            ev = task.stage_eval_data(ctx)
        with peak_rss(rss, "export", self.log):
            ex = task.stage_export(ctx)
        targets = []
        for board in self.cfg.boards():
            # a decode budget's device at the precision the budget chose (sglp_edge.budget.run.decode_precision)
            with decode_precision(self.run_dir, board, self.log) as stage_board:
                with peak_rss(rss, f"compile:{board.device}", self.log):
                    comp = task.stage_compile(ctx, stage_board)
                with peak_rss(rss, f"bench:{board.device}", self.log):  # the benchmark itself runs in a child process
                    b = stage_bench(ctx, stage_board, comp["stage"])
            targets.append((board, comp, b))
        return task.build_report(ctx, prune, ft, ev, ex, targets)

    def _add_latency_search(self, report: dict[str, Any]) -> None:
        """``prune.keep: auto``: the search's record and the final alternating check of the budget."""
        plan = self.run_dir / "prune" / "plan.json"
        search = json.loads(plan.read_text()).get("search") or {}
        self.log("final check of the latency budget: original and pruned timed in alternating passes")
        verification = verify_final(self.run_dir, search, bench_overrides(self.cfg)) if search else None
        report["latency_search"] = search_report(plan, report, verification)
        report.setdefault("extra_html", []).append(search_html(report["latency_search"]))
