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
:mod:`sglp_edge.tasks`, one file per task. The per-device stages (compile, benchmark) are in
:mod:`sglp_edge.pipeline.boards`, mixed into :class:`Pipeline`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sglp_edge.pipeline.config import (BoardSection, EvalSection, ExportSection, FinetuneSection, PruneSection,  # noqa: F401
                     RunConfig, TextSection, apply_task_defaults, load_config)
from sglp_edge.pipeline.boards import BoardStages, _bench_overrides  # noqa: F401
from sglp_edge.report.assemble import NEEDS_BOARD  # noqa: F401

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


_CODE_HASH: str | None = None


def _code_hash() -> str:
    """Content hash of this tool's own code: a stage re-runs when the code that made it changed."""
    global _CODE_HASH
    if _CODE_HASH is None:
        import hashlib

        root = Path(__file__).resolve().parents[2]
        h = hashlib.sha256()
        for pkg in ("sglp_edge", "exporters", "benchmarks"):
            for f in sorted((root / pkg).rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()[:16]
    return _CODE_HASH


class Pipeline(BoardStages):
    def __init__(self, cfg: RunConfig, run_dir: Path, *, force: bool = False, log=print):
        from sglp_edge.pipeline.stages import StageRunner

        from sglp_edge.tasks import get_task

        self.cfg, self.run_dir, self.log = apply_task_defaults(cfg), Path(run_dir), log
        self.task = get_task(self.cfg.task)
        self._new_dir = not self.run_dir.exists()
        self.runner = StageRunner(self.run_dir, force=force, log=log)
        self.peak_rss_mb: dict[str, Any] = {}
        self._loaded = None
        self._data = None

    # ---- shared, lazily loaded state ---------------------------------------------------------
    @property
    def loaded(self):
        if self._loaded is None:
            from sglp_edge.models.registry import load_model

            self._loaded = load_model(self.cfg.model, units=self.cfg.units, trust_builder=self.cfg.trust_builder,
                                      trust_remote_code=self.cfg.trust_remote_code)
        return self._loaded

    @property
    def data(self):
        if self._data is None:
            self._data = self.task.load_data(self)
        return self._data

    def _inputs(self, stage: str, **more: Any) -> dict[str, Any]:
        base = {"model": self.cfg.model, "data": self.cfg.data, "seed": self.cfg.seed, "code": _code_hash()}
        if self.cfg.task != "image-classification":  # (keeps the image runs' stage hashes as they were)
            base.update(task=self.cfg.task, text=self.cfg.text.model_dump())
        if self.cfg.units:
            base["units"] = self.cfg.units
        return {**base, **more}

    # ---- stages -------------------------------------------------------------------------------
    def stage_prune(self) -> dict[str, Any]:
        from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job

        p = self.cfg.prune
        more: dict[str, Any] = {}
        extra_inputs: dict[str, Any] = {}
        if p.keep == "auto":  # a latency budget on the first device (sglp_edge.budget)
            from sglp_edge.budget.run import prune_settings

            more, extra_inputs = prune_settings(self.cfg, _bench_overrides(self.cfg), self.log)

        def fn(tmp: Path) -> dict[str, Any]:
            job = PruneJob(model=self.cfg.model, out=tmp / "out", data=self.cfg.data,
                           data_root=Path(self.cfg.data_root) if self.cfg.data_root else None, seed=self.cfg.seed,
                           **p.model_dump(), **more)  # every prune: field of the config is a PruneJob field
            res = run_prune_job(job, loaded=self.loaded, show_progress=True)
            for f in (tmp / "out").iterdir():  # flatten: prune/{model,plan.json,cka_heatmap.png}
                f.rename(tmp / f.name)
            (tmp / "out").rmdir()
            pl = res.plan
            out = {"removed": pl.removed, "kept": pl.kept, "units": f"{pl.n_units_before}->{pl.n_units_after}",
                   "macs_reduction": pl.macs_reduction, "evaluations": pl.evaluations}
            if pl.search:
                out["latency_search"] = {k: pl.search[k] for k in ("device", "budget_ms", "margin", "rounds", "chosen")}
            return out

        return self.runner.stage("prune", self._inputs("prune", prune=p.model_dump(), **extra_inputs), fn)

    def stage_finetune(self) -> dict[str, Any]:
        from sglp_edge.train.finetune import FinetuneConfig, finetune
        from sglp_edge.train.kd import kept_unit_map
        from sglp_edge.models.registry import load_model

        f = self.cfg.finetune
        prune_hash = self.runner.file_hash("prune", "model/model.safetensors")

        def fn(tmp: Path) -> dict[str, Any]:
            student = load_model(str(self.run_dir / "prune" / "model"), trust_builder=self.cfg.trust_builder)
            teacher = self.loaded
            work = self.run_dir / ".work" / "finetune"
            work.mkdir(parents=True, exist_ok=True)
            # the state file is keyed by the pruned weights and the fine-tune settings: a new prune or a
            # changed fine-tune starts afresh, and an older state stays on disk for its own settings
            import hashlib

            key = hashlib.sha256(json.dumps([prune_hash, f.model_dump()], sort_keys=True, default=str).encode())
            state = work / f"state-{key.hexdigest()[:12]}.pt"
            fmap = None
            if f.feature_kd > 0:
                prior = (teacher.meta or {}).get("removal_rounds") or []
                fmap = kept_unit_map(teacher.model, teacher.adapter, student.meta["removal_rounds"][len(prior):])
            fcfg = FinetuneConfig(epochs=f.epochs, steps=f.steps, minutes=f.minutes, batch_size=f.batch_size, lr=f.lr,
                                  optimizer=f.optimizer, weight_decay=f.weight_decay, val_samples=f.val_samples,
                                  test_samples=f.test_samples,
                                  alpha=f.alpha, temperature=f.temperature, feature_weight=f.feature_kd,
                                  feature_map=fmap, seed=self.cfg.seed, state_path=str(state))
            res = finetune(student.model, teacher.model, student.adapter, self.data, fcfg)
            self.task.save_model(self, student, res.model, tmp / "model", {"finetune": res.summary()})
            return res.summary()

        if not f.enabled:
            return {"skipped": "finetune.enabled is false"}
        return self.runner.stage("finetune", self._inputs("finetune", finetune=f.model_dump(), pruned=prune_hash), fn)

    def final_stage(self) -> str:
        return "finetune" if self.cfg.finetune.enabled else "prune"

    def final_model_dir(self) -> Path:
        return self.run_dir / self.final_stage() / "model"

    def stage_eval_data(self) -> dict[str, Any]:
        """Held-out images with labels and each model's PyTorch logits, as .npz for the board, and
        training images for INT8 calibration."""
        import numpy as np
        import torch

        from benchmarks.board.calib import save_npz
        from sglp_edge.models.registry import load_checkpoint

        final_stage = "finetune" if self.cfg.finetune.enabled else "prune"
        final_hash = self.runner.file_hash(final_stage, "model/model.safetensors")

        def fn(tmp: Path) -> dict[str, Any]:
            d = self.data
            n = self.cfg.eval.samples
            test = d.split("test")
            idx = list(range(min(n, len(test))))
            x = torch.stack([test[i][0] for i in idx])
            y = torch.tensor([int(test[i][1]) for i in idx])
            out = {}
            pruned = load_checkpoint(self.final_model_dir(), trust_builder=self.cfg.trust_builder).model
            for which, model in (("original", self.loaded.model), ("pruned", pruned)):
                model.eval()
                with torch.no_grad():
                    logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
                top1 = float((logits.argmax(1) == y).double().mean() * 100)
                out[which] = {"top1": top1, "logits": logits.numpy()}
            for which in ("original", "pruned"):
                save_npz(tmp / f"eval_{which}.npz", x.numpy().astype(np.float32), y.numpy().astype(np.int64),
                         logits=out[which]["logits"].astype(np.float32))
                # the board computes the accuracy drop against the unpruned model's top-1
                with np.load(tmp / f"eval_{which}.npz") as z:
                    arrays = dict(z)
                arrays["baseline_top1"] = np.float64(out["original"]["top1"])
                np.savez(tmp / f"eval_{which}.npz", **arrays)
            cal = d.calibration_batches(max(1, self.cfg.eval.calib_samples // 100), 100, seed=self.cfg.seed + 1)
            cx = torch.cat([b[0] for b in cal]).numpy().astype(np.float32)
            cy = torch.cat([b[1] for b in cal]).numpy().astype(np.int64)
            save_npz(tmp / "calib.npz", cx, cy)
            return {"samples": len(idx), "torch_top1": {k: v["top1"] for k, v in out.items()}, "split": "test"}

        return self.runner.stage("eval_data", self._inputs("eval", eval=self.cfg.eval.model_dump(), final=final_hash), fn)

    def stage_export(self) -> dict[str, Any]:
        from sglp_edge.export.onnx_export import export_onnx
        from sglp_edge.models.registry import load_checkpoint

        final_stage = "finetune" if self.cfg.finetune.enabled else "prune"
        final_hash = self.runner.file_hash(final_stage, "model/model.safetensors")
        e = self.cfg.export

        def fn(tmp: Path) -> dict[str, Any]:
            import numpy as np
            import torch

            with np.load(self.run_dir / "eval_data" / "eval_original.npz") as z:
                px = torch.from_numpy(z["x"][:256])
                py = z["y"][:256]
            res = {}
            pruned = load_checkpoint(self.final_model_dir(), trust_builder=self.cfg.trust_builder).model
            for which, model in (("original", self.loaded.model), ("pruned", pruned)):
                r = export_onnx(model, px[:1], tmp / f"{which}.onnx", kind="image", opset=e.opset, simplify=e.simplify,
                                parity_inputs=px, parity_labels=py, parity_source="held-out test images",
                                progress=False)
                res[which] = {"opset": r.opset, "exporter": r.exporter, "parity": r.parity, "sha256": r.sha256,
                              "size_bytes": r.size_bytes, "simplify": r.simplify}
            return res

        return self.runner.stage("export", self._inputs("export", export=e.model_dump(), final=final_hash), fn)

    # ---- whole run ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Cheap checks before any stage: every device profile, and the data against the model
        (shape, labels, declared units) on two samples."""
        from sglp_edge.profiles.load import load_profile
        from sglp_edge.pipeline.prune_job import check_fit

        for board in self.cfg.boards():
            load_profile(board.device)
        if self.loaded.adapter.modality == "image":
            batch = self.data.calibration_batches(1, 2, seed=self.cfg.seed)[0]
            check_fit(self.loaded, batch, data=self.cfg.data, num_classes=self.data.num_classes)

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.runner.close()

    def _run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            self.validate()
        except BaseException:
            if self._new_dir and {p.name for p in self.run_dir.iterdir()} <= {".sglp-edge", ".lock"}:
                import shutil

                shutil.rmtree(self.run_dir, ignore_errors=True)  # a refused run leaves no empty run folder
            raise
        task, rss = self.task, self.peak_rss_mb
        with peak_rss(rss, "prune", self.log):
            prune = self.stage_prune()
        with peak_rss(rss, "finetune", self.log):
            ft = self.stage_finetune()
        with peak_rss(rss, "eval_data", self.log):
            ev = task.stage_eval_data(self)
        with peak_rss(rss, "export", self.log):
            ex = task.stage_export(self)
        targets = []
        for board in self.cfg.boards():
            with peak_rss(rss, f"compile:{board.device}", self.log):
                comp = task.stage_compile(self, board)
            with peak_rss(rss, f"bench:{board.device}", self.log):  # the benchmark itself runs in a child process
                b = task.stage_bench(self, board, comp["stage"])
            targets.append((board, comp, b))
        report = task.build_report(self, prune, ft, ev, ex, targets)
        if self.cfg.prune.keep == "auto":
            from sglp_edge.budget.run import search_html, search_report, verify_final

            plan = self.run_dir / "prune" / "plan.json"
            search = json.loads(plan.read_text()).get("search") or {}
            self.log("final check of the latency budget: original and pruned timed in alternating passes")
            verification = verify_final(self.run_dir, search, _bench_overrides(self.cfg)) if search else None
            report["latency_search"] = search_report(plan, report, verification)
            report.setdefault("extra_html", []).append(search_html(report["latency_search"]))
        report["wall_s"] = time.perf_counter() - t0
        report["task"] = task.name
        report["peak_rss_mb"] = {"host_stages": dict(rss), "bench_children": {
            f"{t['device']}:{w}": (t["results"].get(w) or {}).get("peak_rss_mb") for t in report.get("targets", [])
            for w in ("original", "pruned")}}
        self.log("peak RSS per stage (MiB, this process): " + ", ".join(f"{k} {v}" for k, v in rss.items()))
        from sglp_edge.report.render import write_report

        write_report(report, self.run_dir)
        return report

    def build_report(self, prune, ft, ev, ex, targets) -> dict[str, Any]:
        from sglp_edge.report.assemble import build_report

        return build_report(self, prune, ft, ev, ex, targets)
