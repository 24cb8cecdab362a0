"""``keep: auto`` for a causal LM: the number of decoder layers AND the precision, chosen together,
whose predicted decode speed (tokens/s) and prefill (TTFT) meet a budget on the device.

The budget: ``--decode-budget TOK_S`` (``prune.decode_budget_tps``) and/or ``--ttft-budget MS``
(``prune.ttft_budget_ms``); neither given, the first device profile's ``decode_tokens_per_s >=``
and ``ttft_ms <=`` constraints. The precisions searched (:func:`decode_precisions`): the profile's
and every lower one of fp32 -> int8 -> int4 that the backend builds for an LM and its profiles can
name (onnxruntime-genai: fp32, int8, int4; ONNX Runtime: fp32, int8; OpenVINO: fp32, int8), or
those of ``--decode-precisions fp32,int8`` (``prune.decode_precisions``). Per precision ``p`` a
decode model (:mod:`sglp_edge.budget.decode_model`, measured by :mod:`sglp_edge.budget.decode_measure`
on the device) predicts every layer count ``L`` from 1 to the model's depth; a candidate meets the
budget when its predicted tokens/s >= budget / (1 - margin) (``prune.latency_margin``) and its
TTFT <= budget x (1 - margin). ``L_p`` is the most layers meeting it at ``p``.

Among the feasible ``(L_p, p)`` the least PREDICTED perplexity is chosen, an estimate:
``ppl_layers(L_p) x q(p)``. ``q(p)`` is the perplexity of the full-depth artifact at ``p`` over that
of the full-depth fp32 artifact, both measured on the device runtime during the fit on a few
held-out calibration-side blocks (without fp32 in the search, over PyTorch's full-depth figure),
kept monotone (a lower precision never predicted better). ``ppl_layers(L)`` is PyTorch's perplexity
of the model cut to ``L`` layers without recovery, the least influential layers dropped
(:mod:`sglp_edge.budget.decode_quality`; SGLP's own pick is known only after its analysis), kept
monotone (more layers never predicted worse); equal predictions go to more layers, then to the
higher precision. Nothing meeting the budget over every precision searched is the one-line "cannot
be met" error naming the fastest candidate, before any pruning. SGLP then picks WHICH layers to
remove (the same removal-search protocol as the image budget: :class:`DecodeSearch` accepts its
first step), the run compiles and benchmarks the chosen precision on the device (a copy of the
profile with its precision replaced: :mod:`sglp_edge.budget.run`), the fine-tune runs as
configured, and the run's own benchmark measures the result
(:func:`sglp_edge.budget.decode_report.decode_search_report`).

This module is light (no torch): the config check imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import UserError
from sglp_edge.budget.decode_model import DecodeModel
from sglp_edge.profiles.load import load_profile

LM_TASK = "causal-lm"
#: precisions from the highest down (the ranking of the joint choice and of its ties)
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "int4")
#: the LM routes (benchmarks/board/backends.py ``lm_route``) whose artifacts the decode budget builds and times
DECODE_ROUTES = ("onnx", "openvino", "genai")
#: what a decode budget searches by default: the profile's precision and every lower one of these
DEFAULT_LADDER = ("fp32", "int8", "int4")
FLAGS = "--decode-budget TOK_S or --ttft-budget MS (prune.decode_budget_tps / prune.ttft_budget_ms)"


@dataclass
class DecodeBudget:
    tokens_per_s: Optional[float]
    ttft_ms: Optional[float]
    source: str

    def describe(self) -> str:
        parts = ([f"decode >= {self.tokens_per_s:g} tok/s"] if self.tokens_per_s is not None else []) + \
                ([f"TTFT <= {self.ttft_ms:g} ms"] if self.ttft_ms is not None else [])
        return " and ".join(parts)


def decode_budget(profile: Any, tokens_per_s: Optional[float], ttft_ms: Optional[float]) -> DecodeBudget:
    """The budget and where it came from: the given values, else the profile's constraints."""
    for flag, v in (("--decode-budget", tokens_per_s), ("--ttft-budget", ttft_ms)):
        if v is not None and not v > 0:
            raise UserError(f"{flag} must be a positive number (got {v})")
    if tokens_per_s is not None or ttft_ms is not None:
        return DecodeBudget(tokens_per_s, ttft_ms, "given")
    tps = next((c.limit for c in profile.constraints if c.metric == "decode_tokens_per_s" and c.op == ">="), None)
    ttft = next((c.limit for c in profile.constraints if c.metric == "ttft_ms" and c.op == "<="), None)
    if tps is None and ttft is None:
        raise UserError(f"keep: auto for a causal LM needs a decode budget: profile {profile.name} has no "
                        f"decode_tokens_per_s or ttft_ms constraint; give {FLAGS}")
    b = DecodeBudget(tps, ttft, "")
    b.source = f"profile {profile.name}: {b.describe()}"
    return b


def refuse_latency_budget(latency_budget_ms: Optional[float]) -> None:
    if latency_budget_ms is not None:
        raise UserError(f"--latency-budget (prune.latency_budget_ms) is a p90 budget for image models; a causal LM "
                        f"takes {FLAGS}")


def check_decode_job(profile: Any, latency_budget_ms: Optional[float], tokens_per_s: Optional[float],
                     ttft_ms: Optional[float], precisions: Optional[Sequence[str]] = None) -> DecodeBudget:
    """A decode budget's cheap checks (a prune job's, the config's): an LM profile, no p90 budget,
    precisions the backend builds."""
    refuse_latency_budget(latency_budget_ms)
    if profile.task != LM_TASK:
        raise UserError(f"a decode budget is searched on the first device, {profile.name}, whose profile is for "
                        f"{profile.task}; give a causal-lm profile (e.g. --device local-cpu-genai-lm)")
    if get_backend(profile.backend).builds_on == "board":
        raise UserError(f"{profile.name}: a decode budget needs the {profile.backend} artifact timed on the board, "
                        "which is built there; decode budgets are available for host-built backends (onnxruntime, "
                        "openvino, onnxruntime-genai)")
    if get_backend(profile.backend).lm_route not in DECODE_ROUTES:
        raise UserError(f"{profile.name}: a decode budget is not yet available for {profile.backend} (its depths are "
                        "built and timed by the onnx, openvino and genai routes: onnxruntime, openvino, "
                        "onnxruntime-genai)")
    decode_precisions(profile, precisions)
    return decode_budget(profile, tokens_per_s, ttft_ms)


def check_auto_config(task: str, prune: Any, device: str) -> None:
    """``prune.keep: auto`` at config load: the budget that fits the task, before any heavy work."""
    decode_given = any(v is not None for v in (prune.decode_budget_tps, prune.ttft_budget_ms, prune.decode_precisions))
    if task == LM_TASK:
        refuse_latency_budget(prune.latency_budget_ms)
        try:
            prof = load_profile(device)
        except UserError:  # reported by the pipeline's validation, with the run's other checks
            return
        check_decode_job(prof, None, prune.decode_budget_tps, prune.ttft_budget_ms, prune.decode_precisions)
    elif task == "image-classification":
        if decode_given:
            raise UserError("--decode-budget / --ttft-budget / --decode-precisions (prune.decode_budget_tps / "
                            "prune.ttft_budget_ms / prune.decode_precisions) are decode budgets for causal LMs; an "
                            "image model takes --latency-budget MS (prune.latency_budget_ms)")
    else:
        raise UserError(f"prune.keep: auto (a latency or decode budget) is not yet available for the {task} task "
                        "(it is for image-classification and causal-lm); give prune.keep N")


def check_budget_modality(decode: bool, modality: str, model: Any) -> None:
    """A prune job's ``keep: auto`` once its model is loaded: a decode budget for a causal LM
    (modality ``tokens``), a p90 latency budget for an image model, none for an encoder yet."""
    if decode and modality != "tokens":
        raise UserError(f"a decode budget (tokens/s, TTFT) is for causal LMs; {model} is a {modality} model: give "
                        "--latency-budget MS (a p90 budget) or --keep N")
    if not decode and modality == "tokens":
        raise UserError("keep: auto for a causal LM takes a decode budget: sglp-edge run --decode-budget TOK_S or "
                        "--ttft-budget MS (a p90 latency budget is for image models); or give --keep N")
    if modality not in ("image", "tokens"):
        raise UserError("keep: auto (a latency budget) is not yet available for encoders; give --keep N")


def precision_rank(p: str) -> int:
    """0 for the highest precision (fp32), larger for lower ones; unknown names after all."""
    return PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER)


def lm_profile_precisions(backend: str) -> tuple[str, ...]:
    """The precisions the backend builds a causal LM in that a profile of it can name (the registry's
    ``lm_precisions``, else its ``precisions``, within what its profiles accept)."""
    be = get_backend(backend)
    return tuple(p for p in (be.lm_precisions or be.precisions) if p in be.run_precisions)


def decode_precisions(profile: Any, requested: Optional[Sequence[str]] = None) -> list[str]:
    """The precisions a decode budget searches, highest first: ``requested`` (``--decode-precisions``,
    ``prune.decode_precisions``), else the profile's and every lower one of fp32 -> int8 -> int4 that
    the backend builds for an LM."""
    avail = lm_profile_precisions(profile.backend)
    if requested is not None:
        bad = [p for p in requested if p not in avail]
        if not requested or bad:
            raise UserError(f"--decode-precisions (prune.decode_precisions) {','.join(requested) or '(none)'}: "
                            f"{profile.name} ({profile.backend}) builds a causal LM in {', '.join(avail)}; give "
                            "one or more of those")
        return sorted(set(requested), key=precision_rank)
    if profile.precision not in PRECISION_ORDER:
        return [profile.precision]
    return [profile.precision] + [p for p in DEFAULT_LADDER
                                  if p in avail and precision_rank(p) > precision_rank(profile.precision)]


class DecodeSearch:
    """Every (layer count, precision) predicted from the decode models, one per precision; per
    precision the most layers meeting the budget, and among those the least predicted perplexity
    (``ppl_layers(L) x q(p)``, see the module docstring), chosen here (the constructor raises when
    nothing meets the budget). For SGLP's analysis it is a removal search (``start``, ``accept``,
    ``exhausted``, ``record``) whose first step is accepted.

    ``ppl_layers``: the PyTorch estimate of the model cut to ``L`` layers
    (:class:`sglp_edge.budget.decode_quality.LayerPerplexity`); without it (or without the models'
    ``ppl_full``) no perplexity is predicted, and the most layers win, then the higher precision."""

    def __init__(self, dm: Union[DecodeModel, Sequence[DecodeModel]], budget: DecodeBudget, profile: Any, *,
                 margin: float = 0.05, prompt_tokens: int = 128, gen_tokens: int = 128,
                 ppl_layers: Optional[Callable[[int], float]] = None) -> None:
        self.models = sorted([dm] if isinstance(dm, DecodeModel) else list(dm), key=lambda m: precision_rank(m.precision))
        self.budget, self.profile, self.margin = budget, profile, float(margin)
        self.prompt_tokens, self.gen_tokens, self.ppl_layers = prompt_tokens, gen_tokens, ppl_layers
        self.need_tps = budget.tokens_per_s / (1.0 - self.margin) if budget.tokens_per_s is not None else None
        self.need_ttft = budget.ttft_ms * (1.0 - self.margin) if budget.ttft_ms is not None else None
        self.q = self._quality_factors()
        self.candidates = [self._candidate(m, n) for m in self.models for n in range(m.n_layers, 0, -1)]
        ok = [c for c in self.candidates if c["meets"]]
        if not ok:
            raise UserError(self._cannot_be_met())
        best: dict[str, dict[str, Any]] = {}
        for c in ok:  # per precision, the most layers meeting the budget (candidates run from the most down)
            best.setdefault(c["precision"], c)
        self._predict_perplexity(list(best.values()))
        self.chosen = min(best.values(), key=self._rank)
        self.dm = next(m for m in self.models if m.precision == self.chosen["precision"])
        ppl = self.chosen.get("predicted_perplexity")
        how = (f"the least predicted perplexity ({ppl:.4g}) of the feasible candidates" if ppl is not None else
               "the most layers (least perplexity), then the higher precision, of the feasible candidates")
        self.chosen["verdict"] = (f"chosen: {how}, within {budget.describe()} ({self.chosen['predicted_tokens_per_s']:.4g}"
                                  f" tok/s, TTFT {self.chosen['predicted_ttft_ms']:.4g} ms predicted)")
        self._verdicts(ok, best)
        self.start = self.chosen_n = self.chosen["n_removed"]

    def _quality_factors(self) -> dict[str, Optional[float]]:
        """q(p): the full-depth artifact's device perplexity at p over fp32's (the fp32 artifact's
        when fp32 is searched, else PyTorch's full-depth figure), kept monotone down the precisions
        (a lower precision never predicted better: measurement noise would otherwise break ties)."""
        fp32 = next((m.ppl_full for m in self.models if m.precision == "fp32"), None)
        if fp32 is None and self.ppl_layers is not None and any(m.ppl_full for m in self.models):
            fp32 = self.ppl_layers(self.models[0].n_layers)
        q, floor = {}, 0.0
        for m in self.models:  # highest precision first
            raw = m.ppl_full / fp32 if (m.ppl_full and fp32) else None
            floor = max(floor, raw) if raw is not None else floor
            q[m.precision] = floor if raw is not None else None
        return q

    def _predict_perplexity(self, best: list[dict[str, Any]]) -> None:
        """ppl_layers(L) x q(p) for each precision's best candidate, ppl_layers kept monotone over
        them (more layers never predicted worse)."""
        if self.ppl_layers is None or any(self.q.get(c["precision"]) is None for c in best):
            return
        floor = float("inf")
        for c in sorted(best, key=lambda c: c["layers"]):
            floor = min(floor, self.ppl_layers(c["layers"]))
            c["ppl_layers"] = floor
            c["predicted_perplexity"] = floor * self.q[c["precision"]]

    def _rank(self, c: dict[str, Any]) -> tuple:
        ppl = c.get("predicted_perplexity")
        return (ppl if ppl is not None else 0.0, -c["layers"], precision_rank(c["precision"]))

    def _verdicts(self, ok: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> None:
        ch = self.chosen
        for c in ok:
            if c is ch:
                continue
            if best[c["precision"]] is not c:
                c["verdict"] += f"; not chosen: fewer layers than {best[c['precision']]['layers']} at {c['precision']}"
            elif c.get("predicted_perplexity") is not None:
                c["verdict"] += (f"; not chosen: predicted perplexity {c['predicted_perplexity']:.4g} against "
                                 f"{ch['predicted_perplexity']:.4g} ({ch['layers']} layers, {ch['precision']})")
            else:
                c["verdict"] += f"; not chosen: {ch['layers']} layers at {ch['precision']} rank first"

    def _candidate(self, dm: DecodeModel, layers: int) -> dict[str, Any]:
        tps, ttft = dm.tokens_per_s(layers), dm.ttft_ms(layers)
        why = []
        if self.need_tps is not None and tps < self.need_tps:
            why.append(f"predicted {tps:.4g} tok/s < {self.need_tps:.4g} (budget / (1 - margin))")
        if self.need_ttft is not None and ttft > self.need_ttft:
            why.append(f"predicted TTFT {ttft:.4g} ms > {self.need_ttft:.4g} ms (budget x (1 - margin))")
        return {"layers": layers, "n_removed": dm.n_layers - layers, "precision": dm.precision,
                "predicted_tokens_per_s": tps, "predicted_ms_per_token": dm.ms_per_token(layers),
                "predicted_ttft_ms": ttft, "q": self.q.get(dm.precision), "predicted_perplexity": None,
                "meets": not why, "verdict": "; ".join(why) if why else "meets the budget (predicted)"}

    def _cannot_be_met(self) -> str:
        cands = self.candidates
        tps_short = self.need_tps is not None and max(c["predicted_tokens_per_s"] for c in cands) < self.need_tps
        if not tps_short and self.need_tps is not None:  # the TTFT fails: the quickest prefill among the fast enough
            cands = [c for c in cands if c["predicted_tokens_per_s"] >= self.need_tps]
        # ties (a flat fit predicts every depth alike): the fewest layers, then the higher precision
        fastest = (max(cands, key=lambda c: (c["predicted_tokens_per_s"], -c["layers"], -precision_rank(c["precision"])))
                   if tps_short else
                   min(cands, key=lambda c: (c["predicted_ttft_ms"], c["layers"], precision_rank(c["precision"]))))
        where = (f"on {self.profile.name}: the fastest candidate ({fastest['layers']} layer"
                 f"{'s' if fastest['layers'] != 1 else ''}, {fastest['precision']}) is predicted at")
        searched = [m.precision for m in self.models]
        lower = [p for p in lm_profile_precisions(self.profile.backend)
                 if precision_rank(p) > max(precision_rank(q) for q in searched)]
        also = f", or allow {'/'.join(lower)} (--decode-precisions)" if lower else ""
        if tps_short:
            return (f"decode budget {self.budget.tokens_per_s:g} tok/s cannot be met {where} "
                    f"{fastest['predicted_tokens_per_s']:.4g} tok/s (with the {self.margin:g} margin it needs "
                    f"{self.need_tps:.4g}; searched {', '.join(searched)}); lower --decode-budget, or pick a faster "
                    f"device{also}")
        return (f"TTFT budget {self.budget.ttft_ms:g} ms cannot be met {where} {fastest['predicted_ttft_ms']:.4g} ms "
                f"(with the {self.margin:g} margin it needs {self.need_ttft:.4g} ms; searched {', '.join(searched)}); "
                f"raise --ttft-budget, or pick a faster device or a shorter eval.prompt_tokens{also}")

    # ---- SGLP's removal-search protocol (sglp_edge.sglp.prune._sglp_select) ---------------------
    def accept(self, removed: Sequence[str]) -> bool:
        self.chosen["removed"] = list(removed)
        return True

    def exhausted(self, n_remove: int) -> None:
        raise UserError(f"decode budget ({self.budget.describe()}) on {self.profile.name}: keeping "
                        f"{self.chosen['layers']} of {self.dm.n_layers} layers means {n_remove} removals, which SGLP "
                        "cannot place while every segment keeps a layer; raise the budget or give prune.k")

    def record(self) -> dict[str, Any]:
        dm, b = self.dm, self.budget
        return {
            "kind": "decode", "device": self.profile.name, "backend": self.profile.backend,
            "precision": dm.precision, "profile_precision": self.profile.precision,
            "precisions": [m.precision for m in self.models],
            "precision_note": "the precision chosen by the decode budget (the run compiles and benchmarks this one)"
                              if dm.precision != self.profile.precision else "the profile's precision",
            "threads": self.profile.threads, "budget_tokens_per_s": b.tokens_per_s, "budget_ttft_ms": b.ttft_ms,
            "budget": b.describe(), "budget_source": b.source, "budget_ms": None, "margin": self.margin,
            "needed_tokens_per_s": self.need_tps, "needed_ttft_ms": self.need_ttft,
            "rounds": len((dm.points or [{}])[0].get("rounds_ms_per_token", [])),
            "n_layers": dm.n_layers, "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens,
            "predicted_full_tokens_per_s": dm.tokens_per_s(dm.n_layers), "quality_factors": self.q,
            "candidates": self.candidates, "chosen": self.chosen, "why": self.chosen.get("verdict"),
            "decode_model": dm.to_dict(), "decode_models": {m.precision: m.to_dict() for m in self.models},
        }
