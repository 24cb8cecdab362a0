"""One prune job (what ``sglp-edge prune`` and the pipeline run): load the model, draw fixed
calibration batches from the TRAINING split, analyse, remove the chosen units and write the output
folder atomically: the pruned model, ``plan.json`` and ``cka_heatmap.png``."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from benchmarks.board.atomic import atomic_dir, check_out_dir
from benchmarks.board.errors import UserError
from sglp_edge import api
from sglp_edge.budget.decode_measure import make_decode_search
from sglp_edge.budget.decode_search import DecodeSearch, check_budget_modality, check_decode_job
from sglp_edge.budget.search import budget_from_profile, check_budget_settings, make_search
from sglp_edge.models import registry  # (registry.load_model: looked up at the call, as the cheap-check tests patch it)
from sglp_edge.models.hf_encoder import save_hf_encoder
from sglp_edge.models.hf_llm import save_hf
from sglp_edge.models.lm_memory import LM_DEFAULT_BATCH, check_prune_job_memory, lm_default_batch
from sglp_edge.profiles.load import load_profile
from sglp_edge.pipeline.calibration import batch_len, calibration_batches, check_fit, fixed_input_size
from sglp_edge.pipeline.progress import analysis_progress
from sglp_edge.sglp.accelerator import analysis_model, batches_on, check_accelerator, choose_accelerator
from sglp_edge.sglp.estimate import estimate_analysis
from sglp_edge.sglp.heal import HEALS
from sglp_edge.sglp.importance import PROTOCOLS, resolve_protocol
from sglp_edge.sglp.plan import ALLOCATIONS, K_BUDGETS, METHODS
from sglp_edge.sglp.plots import cka_heatmap_png
from sglp_edge.sglp.prune import n_remove_for_keep
from sglp_edge.train.teacher_targets import calibration_targets
from sglp_edge.validate import check_file, check_threads


@dataclass
class PruneJob:
    model: str
    out: Path
    data: str = "fashion-mnist"
    data_root: Optional[Path] = None
    keep: Optional[Union[int, str]] = None  # units to keep, or "auto": the fewest removals meeting a latency budget
    target_macs: Optional[float] = None
    method: str = "sglp"
    k: Optional[int] = None
    protocol: str = "auto"
    calib_batches: int = 4
    grad_batches: int = 1
    batch_size: int = 0
    seq_len: int = 128
    exhaustive_budget: int = 64
    beam_width: int = 2
    eval_budget: Optional[int] = 80
    k_budget: str = "raise"
    allocation: str = "auto"
    heal: str = "none"
    units: Optional[str] = None
    weights: Optional[Path] = None
    num_classes: Optional[int] = None
    class_map: Optional[Path] = None  # image folders: folder name -> model class (labels used); else label-free
    allow_degenerate: bool = False  # go on when the model's outputs do not depend on its input
    seed: int = 0
    threads: int = 0
    force: bool = False
    trust_builder: bool = False  # run a checkpoint's builder file whose sha256 no longer matches
    trust_remote_code: bool = False  # run a Hugging Face folder's own code (auto_map)
    # keep: "auto" (sglp_edge.budget): the device whose p90 budget is met, the budget (default: the
    # profile's latency_p90_ms limit), the reserve kept below it for the prediction, measured rounds
    device: Optional[str] = None
    latency_budget_ms: Optional[float] = None
    latency_margin: float = 0.05
    latency_rounds: int = 3
    bench: Optional[dict] = None  # bench setting overrides for the measured rounds
    # keep: "auto" for a causal LM (sglp_edge.budget.decode_search): decode tokens/s and/or TTFT (default:
    # the profile's limits), timed at the run's prompt and generation lengths
    budget_kind: str = "latency"  # "latency" (a p90, images) | "decode" (implied by either decode budget)
    decode_budget_tps: Optional[float] = None
    ttft_budget_ms: Optional[float] = None
    decode_precisions: Optional[list[str]] = None  # searched with the layers (default: the profile's and lower)
    lm_prompt_tokens: int = 128
    lm_gen_tokens: int = 128
    export_opset: Optional[int] = None
    export_simplify: str = "onnxslim"
    accelerator: str = "auto"  # where the analysis runs: auto (CUDA when torch sees one) | cpu | cuda
    log: Optional[Callable[[str], None]] = None

    def validate(self) -> None:
        """Cheap checks of every setting, before the model or the data are touched."""
        if self.keep == "auto" or self.latency_budget_ms is not None or self.is_decode_budget():
            self._validate_auto()
        elif self.keep is None and self.target_macs is None:
            raise UserError("say how much to prune: --keep N (units to keep), --target-macs R (fraction of MACs to "
                            "remove) or --latency-budget MS (keep auto)")
        elif self.keep is not None and self.target_macs is not None:
            raise UserError("give exactly one of --keep N or --target-macs R")
        elif isinstance(self.keep, str):
            raise UserError(f"--keep is a number of units or 'auto' (got {self.keep!r})")
        elif self.keep is not None and self.keep < 1:
            raise UserError(f"--keep must be >= 1 (got {self.keep})")
        if self.target_macs is not None and not 0.0 < self.target_macs < 1.0:
            raise UserError(f"--target-macs is the fraction of MACs to remove, between 0 and 1; got {self.target_macs}")
        for name, value, allowed in (("--method", self.method, METHODS), ("--protocol", self.protocol, ("auto", *PROTOCOLS)),
                                     ("--allocation", self.allocation, ALLOCATIONS),
                                     ("--k-budget", self.k_budget, K_BUDGETS), ("--heal", self.heal, HEALS)):
            if value not in allowed:
                what = name.lstrip("-")
                raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)} ({name})")
        for name, value, zero_ok in (("--calib-batches", self.calib_batches, False),
                                     ("--grad-batches", self.grad_batches, False),
                                     ("--batch-size", self.batch_size, True), ("--seq-len", self.seq_len, False),
                                     ("--beam-width", self.beam_width, False),
                                     ("--exhaustive-budget", self.exhaustive_budget, True),
                                     ("--eval-budget", self.eval_budget, True), ("--k", self.k, False)):
            if value is not None and (value < 0 or (value == 0 and not zero_ok)):
                raise UserError(f"{name} must be {'>= 0' if zero_ok else '>= 1'} (got {value})")
        check_threads("--threads", self.threads)
        if self.weights is not None:
            check_file(self.weights, "weights file")
        check_accelerator(self.accelerator)
        check_prune_job_memory(str(self.model), self.batch_size, self.seq_len,  # before the weights are loaded
                               forward_only=self.protocol in ("auto", "loss"))
        if self.class_map is not None and not Path(self.class_map).is_file():
            raise UserError(f"class map {self.class_map} does not exist; give a JSON file of folder name -> class index")


    def _validate_auto(self) -> None:
        if self.keep not in (None, "auto") or self.target_macs is not None:
            raise UserError("a latency budget chooses how many units to keep: give --latency-budget (keep: auto) "
                            "or --keep N / --target-macs R, not both")
        self.keep = "auto"
        if self.method != "sglp":
            raise UserError(f"a latency budget (keep: auto) searches with SGLP; --method {self.method} takes --keep N")
        check_budget_settings(self.latency_margin, self.latency_rounds)
        if self.is_decode_budget():
            check_decode_job(load_profile(self.device or "local-cpu-ort-lm"), self.latency_budget_ms,
                             self.decode_budget_tps, self.ttft_budget_ms, self.decode_precisions)
        else:
            budget_from_profile(load_profile(self.device or "local-cpu-ort"), self.latency_budget_ms)

    def is_decode_budget(self) -> bool:
        return self.budget_kind == "decode" or self.decode_budget_tps is not None or self.ttft_budget_ms is not None


@dataclass
class PruneResult:
    plan: Any  # PrunePlan
    pruned: torch.nn.Module
    loaded: Any  # LoadedModel of the original
    out: Path


def _check_unit_counts(job: PruneJob, units: list) -> None:
    if job.k is not None and job.k > len(units):
        raise UserError(f"--k {job.k} must be between 1 and the number of units ({len(units)}) of {job.model}")
    if isinstance(job.keep, int):
        n_remove_for_keep(units, job.keep)


def run_prune_job(job: PruneJob, *, show_progress: bool = False, loaded: Any = None) -> PruneResult:
    job.validate()
    check_out_dir(job.out, force=job.force)  # atomic_dir replaces job.out whole: only a folder of ours, with force
    if job.threads:
        torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    owned = loaded is None  # the job loaded the model itself: an LM's layers may then be removed in place
    if loaded is None:
        loaded = registry.load_model(job.model, weights=job.weights, num_classes=job.num_classes, units=job.units,
                            trust_builder=job.trust_builder, trust_remote_code=job.trust_remote_code)
    model, adapter = loaded.model, loaded.adapter
    _check_unit_counts(job, adapter.units(model))  # --k and --keep, before any calibration data is drawn
    info: dict[str, Any] = {}
    if adapter.modality == "tokens" and not job.batch_size:  # the default batch shrinks on big models
        job.batch_size, info["batch_size_why"] = lm_default_batch(sum(p.numel() for p in model.parameters()))
        if job.batch_size != LM_DEFAULT_BATCH:
            (job.log or print)(f"calibration batch: {info['batch_size_why']}")
    cka_b = calibration_batches(loaded, job.data, n_batches=job.calib_batches, batch_size=job.batch_size,
                                seq_len=job.seq_len, seed=job.seed, data_root=job.data_root, info=info,
                                class_map=job.class_map)
    target, why = check_fit(loaded, cka_b[0], data=job.data, num_classes=info.get("num_classes"),
                            batch_size=batch_len(cka_b[0]), label_info=info)
    grad_b = cka_b[: job.grad_batches] if job.grad_batches <= len(cka_b) else calibration_batches(
        loaded, job.data, n_batches=job.grad_batches, batch_size=job.batch_size, seq_len=job.seq_len,
        seed=job.seed, data_root=job.data_root, offset=1, class_map=job.class_map)
    cka_b, grad_b = calibration_targets(loaded, cka_b, grad_b, target=target, why=why,
                                        allow_degenerate=job.allow_degenerate, log=job.log or print)
    opts = dict(keep=job.keep, target_macs=job.target_macs, method=job.method, k=job.k, protocol=job.protocol,
                exhaustive_budget=job.exhaustive_budget, beam_width=job.beam_width,
                eval_budget=job.eval_budget or None, k_budget=job.k_budget, allocation=job.allocation, heal=job.heal, seed=job.seed,
                target=_target_name(loaded.adapter, target), allow_degenerate=job.allow_degenerate)
    search = None
    if job.keep == "auto":
        check_budget_modality(job.is_decode_budget(), adapter.modality, job.model)
        work = Path(tempfile.mkdtemp(prefix="sglp-latency-"))
        try:
            if job.is_decode_budget():  # the layers and precision predicted to meet it; SGLP picks which layers
                n_cal = sum(batch_len(b) for b in cka_b)  # + the calibration-side blocks after them (q(p))
                drawn = calibration_batches(loaded, job.data, n_batches=1, batch_size=n_cal + 4, seq_len=job.seq_len,
                                            seed=job.seed, data_root=job.data_root)[0]
                search = make_decode_search(loaded, device=job.device, tokens_per_s=job.decode_budget_tps,
                                            ttft_ms=job.ttft_budget_ms, margin=job.latency_margin,
                                            rounds=job.latency_rounds, work=work, prompt_tokens=job.lm_prompt_tokens,
                                            gen_tokens=job.lm_gen_tokens, opset=job.export_opset, bench=job.bench,
                                            seed=job.seed, log=job.log or print, precisions=job.decode_precisions,
                                            calib=cka_b, drawn=drawn)
                opts.update(keep=None, removal_search=search)
            else:
                search = make_search(loaded, cka_b, device=job.device, budget_ms=job.latency_budget_ms,
                                     margin=job.latency_margin, rounds=job.latency_rounds, work=work,
                                     opset=job.export_opset, simplify=job.export_simplify, bench=job.bench,
                                     seed=job.seed, log=job.log or print)
                opts.update(keep=None, unit_costs=search.lm.unit_costs_ms, removal_search=search)
            return _finish(job, loaded, cka_b, grad_b, opts, show_progress, t0, search, owned, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _finish(job, loaded, cka_b, grad_b, opts, show_progress, t0, None, owned, info)


def _analyze(job: PruneJob, loaded: Any, cka_b: list, grad_b: list, opts: dict, show_progress: bool) -> tuple[Any, dict]:
    """The analysis on the chosen accelerator, announced with its estimate; returns (plan, what to record)."""
    model, adapter = loaded.model, loaded.adapter
    placement = choose_accelerator(job.accelerator, adapter.modality)
    amodel = analysis_model(model, placement)
    a_cka, a_grad = batches_on(cka_b, placement), batches_on(grad_b, placement)
    log = job.log or print
    est = None
    if opts.get("method") == "sglp":
        est = estimate_analysis(amodel, adapter, placement, a_cka, a_grad,
                                protocol=resolve_protocol(opts.get("protocol") or "auto", adapter.modality),
                                eval_budget=opts.get("eval_budget"))
        log(est.line())
    progress = analysis_progress() if show_progress else None
    if progress:
        with progress:
            plan = api.analyze(amodel, a_cka, grad_batches=a_grad, adapter=adapter, progress=progress, **opts)
    else:
        plan = api.analyze(amodel, a_cka, grad_batches=a_grad, adapter=adapter, **opts)
    if amodel is not model:
        del amodel
        if placement.device.type == "cuda":
            torch.cuda.empty_cache()
    return plan, {"accelerator": placement.to_dict(), **({"estimate": est.to_dict()} if est else {})}


def _finish(job: PruneJob, loaded: Any, cka_b: list, grad_b: list, opts: dict, show_progress: bool, t0: float,
            search: Any, owned: bool = False, info: Optional[dict] = None) -> PruneResult:
    model, adapter = loaded.model, loaded.adapter
    plan, record = _analyze(job, loaded, cka_b, grad_b, opts, show_progress)
    if owned and adapter.modality == "tokens" and (plan.config or {}).get("heal", "none") == "none":
        pruned = adapter.remove(model, plan.removed, inplace=True)  # no second copy of a large LM's weights
    else:
        pruned = api.apply(model, plan, adapter=adapter, calib=cka_b)
    n_after = len(adapter.units(pruned)) if adapter.family != "generic" else plan.n_units_after
    if n_after != plan.n_units_after:  # surgery must match the plan exactly
        raise RuntimeError(f"pruned model has {n_after} units, plan says {plan.n_units_after}")
    plan_d = plan.to_dict()
    plan_d.update(model_source=str(job.model), data=job.data, total_wall_s=time.perf_counter() - t0, **record,
                  calibration={"cka_batches": len(cka_b), "grad_batches": len(grad_b),
                               "batch_size": batch_len(cka_b[0]), "split": "train",
                               **({"batch_size_why": info["batch_size_why"]} if info and "batch_size_why" in info else {}),
                               "input_shape": list(_first(cka_b[0]).shape[1:]),
                               "resized_to": fixed_input_size(model)})
    with atomic_dir(job.out) as tmp:
        model_dir = tmp / "model"
        if adapter.modality == "tokens":
            save_hf(pruned, model_dir, tokenizer=loaded.tokenizer, extra={"plan": "../plan.json", "removed": plan.removed})
        elif adapter.modality == "sentences":
            save_hf_encoder(pruned, model_dir, tokenizer=loaded.tokenizer,
                            extra={"plan": "../plan.json", "removed": plan.removed})
        else:
            spec = loaded.meta.get("spec") if loaded.meta else None
            prior = (loaded.meta or {}).get("removal_rounds") or []
            registry.save_checkpoint(pruned, adapter, model_dir, spec=spec or registry.model_spec(adapter, model),
                            removed_units=[*prior, plan.removed],
                            extra={"pruned_from": str(job.model), "method": plan.method})
        if search is not None:
            plan_d["config"]["keep"] = "auto"
            name, model_d = (("decode_model.json", search.dm.to_dict()) if isinstance(search, DecodeSearch)
                             else ("latency_model.json", search.lm.to_dict()))
            (tmp / name).write_text(json.dumps(model_d, indent=2) + "\n")
        (tmp / "plan.json").write_text(json.dumps(plan_d, indent=2) + "\n")
        if plan.cka is not None:
            (tmp / "cka_heatmap.png").write_bytes(cka_heatmap_png(plan_d))
    return PruneResult(plan, pruned, loaded, job.out)


def _target_name(adapter: Any, target: str) -> str:
    """What candidates are scored against (plan.json config "target")."""
    return {"tokens": "next-token", "sentences": "teacher-embeddings"}.get(adapter.modality, target)


def _first(b: Any) -> torch.Tensor:
    if isinstance(b, (tuple, list)):
        return b[0]
    if isinstance(b, dict):
        return b["input_ids"]
    return b
