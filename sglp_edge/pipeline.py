"""``sglp-edge run``: prune -> fine-tune -> export -> compile -> benchmark -> report, for one or
more device profiles, in one run folder.

Each stage is a sub-folder written atomically and recorded in ``manifest.json`` with the hash of
its inputs and of every file it wrote (see :mod:`sglp_edge.stages`): a re-run skips finished
stages, a killed run resumes where it stopped, and a changed setting re-runs only the stages
downstream of it. The fine-tune keeps its own per-epoch checkpoints under ``.work/`` so even an
interrupted fine-tune resumes instead of starting over.

Benchmarks run in a child process on this machine (``local-*`` profiles), or on a board over SSH
when the profile (or the config) names a host.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneSection(_Strict):
    keep: Optional[int] = None
    target_macs: Optional[float] = None
    method: str = "sglp"
    k: Optional[int] = None
    protocol: str = "natural"
    calib_batches: int = 4
    grad_batches: int = 1
    batch_size: int = 128
    seq_len: int = 128
    eval_budget: int = 80
    allocation: str = "auto"
    heal: Literal["none", "linear"] = "none"

    @model_validator(mode="after")
    def _one_target(self) -> "PruneSection":
        if (self.keep is None) == (self.target_macs is None):
            raise ValueError("give exactly one of prune.keep or prune.target_macs")
        return self


class FinetuneSection(_Strict):
    enabled: bool = True
    epochs: Optional[float] = None
    steps: Optional[int] = None
    minutes: Optional[float] = None
    batch_size: int = 128
    lr: float = 0.05
    alpha: float = 0.9
    temperature: float = 4.0
    feature_kd: float = 0.0


class ExportSection(_Strict):
    opset: Optional[int] = None
    simplify: Literal["onnxslim", "onnxsim", "none"] = "onnxslim"


class EvalSection(_Strict):
    samples: int = 2000  # held-out samples for accuracy of the compiled artifacts
    calib_samples: int = 300  # training samples for INT8 calibration


class BoardSection(_Strict):
    device: str
    host: Optional[str] = None
    port: Optional[int] = None
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    remote_python: Optional[str] = None


class RunConfig(_Strict):
    name: str = "run"
    model: str = "default"
    data: str = "fashion-mnist"
    data_root: Optional[str] = None
    seed: int = 0
    threads: int = 0
    prune: PruneSection
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    export: ExportSection = Field(default_factory=ExportSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    devices: list[str | BoardSection] = Field(default_factory=lambda: ["local-cpu-ort"])
    bench: dict[str, Any] = Field(default_factory=dict)  # overrides of the profiles' bench settings

    def boards(self) -> list[BoardSection]:
        return [d if isinstance(d, BoardSection) else BoardSection(device=d) for d in self.devices]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"run config {path} does not exist (see configs/default.yaml for an example)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for k, v in (overrides or {}).items():
        cur = raw
        *head, last = k.split(".")
        for h in head:
            cur = cur.setdefault(h, {})
        cur[last] = v
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserError(f"{path}: {where}: {err['msg']}") from None


_CODE_HASH: str | None = None


def _code_hash() -> str:
    """Content hash of this tool's own code: a stage re-runs when the code that made it changed."""
    global _CODE_HASH
    if _CODE_HASH is None:
        import hashlib

        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for pkg in ("sglp_edge", "exporters", "benchmarks"):
            for f in sorted((root / pkg).rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()[:16]
    return _CODE_HASH


def _bench_overrides(cfg: RunConfig) -> dict[str, Any]:
    return dict(cfg.bench)


class Pipeline:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, force: bool = False, log=print):
        from .stages import StageRunner

        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        self.runner = StageRunner(self.run_dir, force=force, log=log)
        self._loaded = None
        self._data = None

    # ---- shared, lazily loaded state ---------------------------------------------------------
    @property
    def loaded(self):
        if self._loaded is None:
            from .models.registry import load_model

            self._loaded = load_model(self.cfg.model)
        return self._loaded

    @property
    def data(self):
        if self._data is None:
            from .data import get_dataset

            self._data = get_dataset(self.cfg.data, root=self.cfg.data_root, seed=self.cfg.seed)
        return self._data

    def _inputs(self, stage: str, **more: Any) -> dict[str, Any]:
        base = {"model": self.cfg.model, "data": self.cfg.data, "seed": self.cfg.seed, "code": _code_hash()}
        return {**base, **more}

    # ---- stages -------------------------------------------------------------------------------
    def stage_prune(self) -> dict[str, Any]:
        from .pruning_job import PruneJob, run_prune_job

        p = self.cfg.prune

        def fn(tmp: Path) -> dict[str, Any]:
            job = PruneJob(model=self.cfg.model, out=tmp / "out", data=self.cfg.data,
                           data_root=Path(self.cfg.data_root) if self.cfg.data_root else None, seed=self.cfg.seed,
                           **p.model_dump())  # every prune: field of the config is a PruneJob field
            res = run_prune_job(job, loaded=self.loaded, show_progress=True)
            for f in (tmp / "out").iterdir():  # flatten: prune/{model,plan.json,cka_heatmap.png}
                f.rename(tmp / f.name)
            (tmp / "out").rmdir()
            pl = res.plan
            return {"removed": pl.removed, "kept": pl.kept, "units": f"{pl.n_units_before}->{pl.n_units_after}",
                    "macs_reduction": pl.macs_reduction, "evaluations": pl.evaluations}

        return self.runner.stage("prune", self._inputs("prune", prune=p.model_dump()), fn)

    def stage_finetune(self) -> dict[str, Any]:
        from .finetune import FinetuneConfig, finetune, kept_unit_map
        from .models.registry import load_checkpoint, save_checkpoint

        f = self.cfg.finetune
        prune_hash = self.runner.file_hash("prune", "model/model.safetensors")

        def fn(tmp: Path) -> dict[str, Any]:
            student = load_checkpoint(self.run_dir / "prune" / "model")
            teacher = self.loaded
            work = self.run_dir / ".work" / "finetune"
            work.mkdir(parents=True, exist_ok=True)
            # the state file is keyed by the pruned weights, so a new prune never resumes an old fine-tune
            state = work / f"state-{prune_hash[:12]}.pt"
            fmap = None
            if f.feature_kd > 0:
                prior = (teacher.meta or {}).get("removal_rounds") or []
                fmap = kept_unit_map(teacher.model, teacher.adapter, student.meta["removal_rounds"][len(prior):])
            fcfg = FinetuneConfig(epochs=f.epochs, steps=f.steps, minutes=f.minutes, batch_size=f.batch_size, lr=f.lr,
                                  alpha=f.alpha, temperature=f.temperature, feature_weight=f.feature_kd,
                                  feature_map=fmap, seed=self.cfg.seed, state_path=str(state))
            res = finetune(student.model, teacher.model, student.adapter, self.data, fcfg)
            save_checkpoint(res.model, student.adapter, tmp / "model", spec=student.meta["spec"],
                            removed_units=student.meta.get("removal_rounds", []),
                            extra={"finetune": res.summary()})
            return res.summary()

        if not f.enabled:
            return {"skipped": "finetune.enabled is false"}
        return self.runner.stage("finetune", self._inputs("finetune", finetune=f.model_dump(), pruned=prune_hash), fn)

    def final_model_dir(self) -> Path:
        return self.run_dir / ("finetune" if self.cfg.finetune.enabled else "prune") / "model"

    def stage_eval_data(self) -> dict[str, Any]:
        """Held-out images with labels and each model's PyTorch logits, as .npz for the board, and
        training images for INT8 calibration."""
        import numpy as np
        import torch

        from exporters.calib import save_npz
        from .models.registry import load_checkpoint

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
            for which, model in (("original", self.loaded.model), ("pruned", load_checkpoint(self.final_model_dir()).model)):
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
        from .export import export_onnx
        from .models.registry import load_checkpoint

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
            for which, model in (("original", self.loaded.model), ("pruned", load_checkpoint(self.final_model_dir()).model)):
                r = export_onnx(model, px[:1], tmp / f"{which}.onnx", kind="image", opset=e.opset, simplify=e.simplify,
                                parity_inputs=px, parity_labels=py, parity_source="held-out test images",
                                progress=False)
                res[which] = {"opset": r.opset, "exporter": r.exporter, "parity": r.parity, "sha256": r.sha256,
                              "size_bytes": r.size_bytes, "simplify": r.simplify}
            return res

        return self.runner.stage("export", self._inputs("export", export=e.model_dump(), final=final_hash), fn)

    def stage_compile(self, board: BoardSection) -> dict[str, Any]:
        from exporters.compile import compile_model
        from .profiles import load_profile

        prof = load_profile(board.device)
        name = f"compile-{prof.backend}-{prof.precision}"
        onnx_hashes = {w: self.runner.file_hash("export", f"{w}.onnx") for w in ("original", "pruned")}

        def fn(tmp: Path) -> dict[str, Any]:
            out = {}
            for which in ("original", "pruned"):
                man = compile_model(self.run_dir / "export" / f"{which}.onnx", prof.backend, prof.precision, tmp / which,
                                    calib=self.run_dir / "eval_data" / "calib.npz",
                                    eval_data=self.run_dir / "eval_data" / f"eval_{which}.npz",
                                    eval_samples=500, progress=False)
                out[which] = {k: man.get(k) for k in ("backend", "precision", "parity", "runtime", "seconds") if k in man}
            return out

        return self.runner.stage(name, self._inputs(name, backend=prof.backend, precision=prof.precision,
                                                    onnx=onnx_hashes), fn) | {"stage": name}

    def stage_bench(self, board: BoardSection, compile_stage: str) -> dict[str, Any]:
        from .profiles import evaluate_constraints, load_profile
        from .remote import RemoteJob, SSHTarget, make_bundle, run_local, run_remote

        prof = load_profile(board.device)
        label = board.device + (f"@{board.host}" if board.host else "")
        name = f"bench-{label}".replace("/", "_").replace("@", "_at_")
        art_name = {"openvino": "model.xml", "onnxruntime": "model.onnx", "tensorrt": "model.engine"}[prof.backend]
        inputs = self._inputs(name, profile=prof.model_dump(mode="json"), host=board.model_dump(),
                              bench=_bench_overrides(self.cfg),
                              artifacts={w: self.runner.file_hash(compile_stage, f"{w}/{art_name}")
                                         for w in ("original", "pruned")})

        def fn(tmp: Path) -> dict[str, Any]:
            results = {}
            for which in ("original", "pruned"):
                art = self.run_dir / compile_stage / which / art_name
                data = self.run_dir / "eval_data" / f"eval_{which}.npz"
                out_dir = tmp / which
                host = board.host or (prof.ssh.host if prof.ssh else None)
                if host:
                    sd = prof.ssh
                    target = SSHTarget(
                        host=host, port=board.port or (sd.port if sd else 22),
                        identity=board.identity or (sd.identity if sd else None),
                        known_hosts=board.known_hosts or (sd.known_hosts if sd else None),
                        connect_timeout_s=sd.connect_timeout_s if sd else 10,
                        python=board.remote_python or (sd.python if sd else "python3"),
                        remote_dir=sd.remote_dir if sd else "/tmp", env=dict(sd.env) if sd else {}, label=label,
                    ).validate()
                    bundle = make_bundle(art, data, self.run_dir / ".work" / f"bundle-{which}.tar.gz")
                    args = prof.run_bench_args(artifact=bundle.artifact, out="results/result.json", data=bundle.data,
                                               overrides=_bench_overrides(self.cfg))
                    run = run_remote(RemoteJob(target=target, bundle=bundle, run_args=args, out_dir=out_dir, label=label,
                                               timeout_s=sd.timeout_s if sd else 1800.0))
                else:
                    args = prof.run_bench_args(artifact=str(art), out=str(out_dir / "result.json"), data=str(data),
                                               overrides=_bench_overrides(self.cfg))
                    run = run_local(args, out_dir, label=f"{label}:{which}")
                if not run.ok:
                    raise UserError(f"benchmark of the {which} model on {label} failed: {run.error} "
                                    f"(logs in {self.run_dir / name / which})")
                doc = run.result or {}
                results[which] = doc
            m = dict(results["pruned"].get("metrics", {}))
            cons = [c.model_dump() for c in evaluate_constraints(prof, m)]
            return {"device": prof.name, "backend": prof.backend, "precision": prof.precision, "threads": prof.threads,
                    "constraints": cons, "metrics": {w: r.get("metrics", {}) for w, r in results.items()}}

        return self.runner.stage(name, inputs, fn) | {"stage": name}

    # ---- whole run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        prune = self.stage_prune()
        ft = self.stage_finetune()
        ev = self.stage_eval_data()
        ex = self.stage_export()
        targets = []
        for board in self.cfg.boards():
            comp = self.stage_compile(board)
            b = self.stage_bench(board, comp["stage"])
            targets.append((board, comp, b))
        report = self.build_report(prune, ft, ev, ex, targets)
        report["wall_s"] = time.perf_counter() - t0
        from .report import write_report

        write_report(report, self.run_dir)
        return report

    def build_report(self, prune, ft, ev, ex, targets) -> dict[str, Any]:
        import datetime

        plan = json.loads((self.run_dir / "prune" / "plan.json").read_text())
        tg = []
        for board, comp, b in targets:
            res = {}
            for which in ("original", "pruned"):
                doc = json.loads((self.run_dir / b["stage"] / which / "result.json").read_text())
                m = doc.get("metrics", {})
                lat0 = (doc.get("latency") or [{}])[0]
                res[which] = {
                    "latency_ms": {"p50": m.get("latency_p50_ms"), "p90": m.get("latency_p90_ms"),
                                   "p99": m.get("latency_p99_ms"), "mean": m.get("latency_mean_ms"),
                                   "std": lat0.get("std_ms")},
                    "throughput_per_s": m.get("throughput_items_per_s"),
                    "accuracy": {"top1": m.get("top1_pct")},
                    "agreement": m.get("top1_agreement_pct"),
                    "size_mb": m.get("model_size_mb"), "peak_rss_mb": m.get("peak_memory_mb"),
                    "precision_used": (doc.get("runtime") or {}).get("precision_used") or b["precision"],
                    "raw_ms": lat0.get("raw_ms"),
                }
            passed = all(c["passed"] for c in b["constraints"] if c["passed"] is not None)
            tg.append({"device": b["device"], "backend": b["backend"], "precision": b["precision"],
                       "threads": b["threads"], "passed": passed, "constraints": b["constraints"], "results": res,
                       "compile": comp})
        return {
            "title": f"sglp-edge run '{self.cfg.name}': {self.cfg.model} on {self.cfg.data}",
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "run_dir": str(self.run_dir),
            "model": self.cfg.model, "data": self.cfg.data, "config": self.cfg.model_dump(mode="json"),
            "passed": all(t["passed"] for t in tg) if tg else None,
            "prune": {k: v for k, v in plan.items() if k not in ("cka", "selections")},
            "cka_png": "prune/cka_heatmap.png" if (self.run_dir / "prune" / "cka_heatmap.png").is_file() else None,
            "finetune": ft, "export": ex,
            "torch_eval": {w: {"top1_pct": v} for w, v in (ev.get("torch_top1") or {}).items()},
            "targets": tg,
            "stages": {"ran": self.runner.ran, "skipped": self.runner.skipped},
        }
