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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.board.atomic import atomic_dir, check_out_dir
from benchmarks.board.errors import UserError
from sglp_edge import api
from sglp_edge.budget.decode_measure import make_decode_search
from sglp_edge.budget.decode_search import DecodeSearch, check_budget_modality, check_decode_job
from sglp_edge.budget.search import budget_from_profile, check_budget_settings, make_search
from sglp_edge.data import datasets
from sglp_edge.data.text import get_text_dataset
from sglp_edge.models import registry  # (registry.load_model: looked up at the call, as the cheap-check tests patch it)
from sglp_edge.models.base import capture_unit_outputs
from sglp_edge.models.hf_encoder import save_hf_encoder
from sglp_edge.models.hf_llm import save_hf
from sglp_edge.models.lm_memory import check_prune_job_memory
from sglp_edge.profiles.load import load_profile
from sglp_edge.sglp.heal import HEALS
from sglp_edge.sglp.importance import PROTOCOLS
from sglp_edge.sglp.plan import ALLOCATIONS, K_BUDGETS, METHODS
from sglp_edge.sglp.plots import cka_heatmap_png
from sglp_edge.sglp.prune import n_remove_for_keep
from sglp_edge.tasks.feature_extraction import get_sentence_dataset
from sglp_edge.train.teacher_targets import calibration_targets, choose_target
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
        check_prune_job_memory(str(self.model), self.batch_size, self.seq_len)  # before the weights are loaded
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


def calibration_batches(loaded: Any, data: str, *, n_batches: int, batch_size: int, seq_len: int, seed: int,
                        data_root: Optional[Path] = None, offset: int = 0, info: Optional[dict] = None,
                        class_map: Optional[Path] = None) -> list[Any]:
    """Fixed calibration batches drawn from the training split of ``data`` (never the test split).
    Images: list of (x, y); token models: list of input_ids tensors of shape (batch, seq_len)."""
    if loaded.adapter.modality == "sentences":  # encoders: tokenised calibration sentences with a mask
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: a tokenizer is needed to draw sentence calibration data")
        if data.strip().lower() not in ("text", "english", "python-docs"):
            raise UserError(f"encoders calibrate on English sentences: use --data text (got {data!r})")
        bs = batch_size or 32
        sents = get_sentence_dataset(loaded.tokenizer, data_root, seed=seed, max_length=seq_len,
                                     max_sentences={"train": 1, "val": 1, "test": 1})
        return sents.calibration_batches(n_batches, bs, seed=seed + offset)
    if loaded.adapter.modality == "tokens":
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: a tokenizer is needed to draw text calibration data")
        need = n_batches * (batch_size or 8) * seq_len
        text = get_text_dataset(loaded.tokenizer, data_root, seed=seed, block_size=seq_len,
                                max_tokens=max(4 * need, 200_000))
        return text.calibration_batches(n_batches, batch_size or 8, seed=seed + offset)
    bundle = datasets.get_dataset(data, root=data_root, seed=seed, resize=fixed_input_size(loaded.model),
                           channels=input_channels(loaded.model), class_map=class_map)
    if info is not None:
        info.update(num_classes=bundle.num_classes, class_mapped="class_map" in bundle.meta,
                    named_classes=not bundle.name.startswith("imagefolder"))
    return bundle.calibration_batches(n_batches, batch_size or 128, seed=seed + offset)


def fixed_input_size(model: Any) -> Optional[int]:
    """The square input size a fixed-resolution model insists on (a torchvision ViT's
    ``image_size``; a user model may set ``model.image_size``), else None."""
    size = getattr(model, "image_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def input_channels(model: Any) -> int:
    """The image channels a model takes: 1 for a grey-scale model that says so
    (``model.in_channels == 1``, e.g. the shipped MobileNetV2), else 3 (grey data repeated)."""
    return 1 if getattr(model, "in_channels", None) == 1 else 3


def check_fit(loaded: Any, batch: Any, *, data: str, num_classes: Optional[int] = None,
              batch_size: Optional[int] = None, label_info: Optional[dict] = None) -> tuple[str, str]:
    """Cheap checks on two samples before the heavy work: the data's shape against the model,
    the labels against the model's outputs, and that declared units keep their input's shape.
    With ``label_info`` (``class_mapped``, ``named_classes``: see :func:`teacher_targets.choose_target`)
    data whose labels are not the model's classes is let through: returns ``(target, why)``,
    target "teacher" when the model's own outputs are to be the calibration target."""
    target, why = "labels", ""
    adapter, model = loaded.adapter, loaded.model
    small = _head(batch, 2)
    x = small[0] if isinstance(small, (tuple, list)) else small
    try:
        with torch.no_grad():
            out = adapter.forward(model, small)
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit the model
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{loaded.source} does not take --data {data} inputs of shape {list(x.shape[1:])} "
                        f"({type(e).__name__}: {msg}); use data of the model's input size") from None
    if adapter.modality == "image" and isinstance(out, torch.Tensor) and out.dim() == 2:
        n_out = int(out.shape[-1])
        if label_info is not None:
            target, why = choose_target(n_out, num_classes, class_mapped=bool(label_info.get("class_mapped")),
                                        named_classes=bool(label_info.get("named_classes")))
        labels = small[1] if isinstance(small, (tuple, list)) and len(small) > 1 else None
        if target == "teacher":
            pass
        elif (num_classes and num_classes > n_out) or (labels is not None and int(labels.max()) >= n_out):
            raise UserError(f"--data {data} has {num_classes or int(labels.max()) + 1} classes but the model has {n_out} "
                            f"outputs: labels >= {n_out} would score 0 % top-1; give a model with --num-classes "
                            f"{num_classes or int(labels.max()) + 1} or matching data")
    if hasattr(adapter, "check_shapes"):
        adapter.check_shapes(model, small)
    if batch_size:
        check_memory(loaded, small, batch_size)
    return target, why


def _mem_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(loaded: Any, small: Any, batch_size: int) -> None:
    """Whether one calibration batch fits in memory: the unit outputs CKA keeps, plus the
    activations a GradNorm backward pass holds (measured per sample on two samples, scaled)."""
    avail = _mem_available()
    if avail is None:
        return
    n = _batch_len(small)
    units = loaded.adapter.units(loaded.model)
    outs = capture_unit_outputs(loaded.adapter, loaded.model, units, small)
    per_sample = sum(o.numel() * o.element_size() for o in outs) / max(1, n)
    need = per_sample * batch_size * 3  # kept outputs + forward/backward activations of a GradNorm pass
    if need > avail:
        fit = max(1, int(avail / (3 * per_sample)))
        raise UserError(f"a calibration batch of {batch_size} needs about {need / 2**30:.1f} GiB but "
                        f"{avail / 2**30:.1f} GiB is available; use --batch-size {fit} or less")


def _head(batch: Any, n: int) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(b[:n] for b in batch)
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    return batch[:n]


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
    if loaded is None:
        loaded = registry.load_model(job.model, weights=job.weights, num_classes=job.num_classes, units=job.units,
                            trust_builder=job.trust_builder, trust_remote_code=job.trust_remote_code)
    model, adapter = loaded.model, loaded.adapter
    _check_unit_counts(job, adapter.units(model))  # --k and --keep, before any calibration data is drawn
    info: dict[str, Any] = {}
    cka_b = calibration_batches(loaded, job.data, n_batches=job.calib_batches, batch_size=job.batch_size,
                                seq_len=job.seq_len, seed=job.seed, data_root=job.data_root, info=info,
                                class_map=job.class_map)
    target, why = check_fit(loaded, cka_b[0], data=job.data, num_classes=info.get("num_classes"),
                            batch_size=_batch_len(cka_b[0]), label_info=info)
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
                n_cal = sum(_batch_len(b) for b in cka_b)  # + the calibration-side blocks after them (q(p))
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
            return _finish(job, loaded, cka_b, grad_b, opts, show_progress, t0, search)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _finish(job, loaded, cka_b, grad_b, opts, show_progress, t0, None)


def _finish(job: PruneJob, loaded: Any, cka_b: list, grad_b: list, opts: dict, show_progress: bool, t0: float,
            search: Any) -> PruneResult:
    model, adapter = loaded.model, loaded.adapter
    progress = None
    if show_progress:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=False)
    if progress:
        with progress:
            plan = api.analyze(model, cka_b, grad_batches=grad_b, adapter=adapter, progress=progress, **opts)
    else:
        plan = api.analyze(model, cka_b, grad_batches=grad_b, adapter=adapter, **opts)
    pruned = api.apply(model, plan, adapter=adapter, calib=cka_b)
    n_after = len(adapter.units(pruned)) if adapter.family != "generic" else plan.n_units_after
    if n_after != plan.n_units_after:  # surgery must match the plan exactly
        raise RuntimeError(f"pruned model has {n_after} units, plan says {plan.n_units_after}")
    plan_d = plan.to_dict()
    plan_d.update(model_source=str(job.model), data=job.data, total_wall_s=time.perf_counter() - t0,
                  calibration={"cka_batches": len(cka_b), "grad_batches": len(grad_b),
                               "batch_size": _batch_len(cka_b[0]), "split": "train",
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


def _batch_len(b: Any) -> int:
    if isinstance(b, (tuple, list)):
        return int(b[0].shape[0])
    if isinstance(b, dict):
        return int(b["input_ids"].shape[0])
    return int(b.shape[0])
