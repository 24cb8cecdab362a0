"""``keep: auto`` for a causal LM: the most decoder layers (least perplexity) whose predicted decode
speed (tokens/s) and prefill (TTFT) meet a budget on the device.

The budget: ``--decode-budget TOK_S`` (``prune.decode_budget_tps``) and/or ``--ttft-budget MS``
(``prune.ttft_budget_ms``); neither given, the first device profile's ``decode_tokens_per_s >=``
and ``ttft_ms <=`` constraints. The decode model (:mod:`sglp_edge.budget.decode_model`, measured by
:mod:`sglp_edge.budget.decode_measure` on the device) predicts every layer count ``L`` from 1 to the
model's depth at the profile's precision; a candidate meets the budget when its predicted time per
token is within the budget's time per token less the reserve (``prune.latency_margin``): predicted
tokens/s >= budget / (1 - margin), and likewise TTFT <= budget x (1 - margin). The one with the most
layers is chosen; none meeting it is the one-line "cannot be met" error, before any pruning. SGLP
then picks WHICH layers to remove (the same removal-search protocol as the image budget:
:class:`DecodeSearch` accepts its first step), the fine-tune runs as configured, and the run's own
benchmark measures the result: :func:`decode_search_report` sets it against the prediction.

Precision: the profile's only (its compile stage builds that one); a lower precision is another
profile (e.g. a copy of local-cpu-genai-lm with ``precision: int4``).

This module is light (no torch): the config check imports it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import UserError
from sglp_edge.budget.decode_model import DecodeModel
from sglp_edge.profiles.load import load_profile

LM_TASK = "causal-lm"
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
                     ttft_ms: Optional[float]) -> DecodeBudget:
    """A decode budget's cheap checks (a prune job's, the config's): an LM profile, no p90 budget."""
    refuse_latency_budget(latency_budget_ms)
    if profile.task != LM_TASK:
        raise UserError(f"a decode budget is searched on the first device, {profile.name}, whose profile is for "
                        f"{profile.task}; give a causal-lm profile (e.g. --device local-cpu-genai-lm)")
    if get_backend(profile.backend).builds_on == "board":
        raise UserError(f"{profile.name}: a decode budget needs the {profile.backend} artifact timed on the board, "
                        "which is built there; decode budgets are available for host-built backends (onnxruntime, "
                        "openvino, onnxruntime-genai)")
    return decode_budget(profile, tokens_per_s, ttft_ms)


def check_auto_config(task: str, prune: Any, device: str) -> None:
    """``prune.keep: auto`` at config load: the budget that fits the task, before any heavy work."""
    decode_given = prune.decode_budget_tps is not None or prune.ttft_budget_ms is not None
    if task == LM_TASK:
        refuse_latency_budget(prune.latency_budget_ms)
        try:
            prof = load_profile(device)
        except UserError:  # reported by the pipeline's validation, with the run's other checks
            return
        check_decode_job(prof, None, prune.decode_budget_tps, prune.ttft_budget_ms)
    elif task == "image-classification":
        if decode_given:
            raise UserError("--decode-budget / --ttft-budget (prune.decode_budget_tps / prune.ttft_budget_ms) are "
                            "decode budgets for causal LMs; an image model takes --latency-budget MS "
                            "(prune.latency_budget_ms)")
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


class DecodeSearch:
    """Every layer count predicted from the decode model; the most layers meeting the budget,
    chosen here (the constructor raises when none does). For SGLP's analysis it is a removal
    search (``start``, ``accept``, ``exhausted``, ``record``) whose first step is accepted."""

    def __init__(self, dm: DecodeModel, budget: DecodeBudget, profile: Any, *, margin: float = 0.05,
                 prompt_tokens: int = 128, gen_tokens: int = 128) -> None:
        self.dm, self.budget, self.profile, self.margin = dm, budget, profile, float(margin)
        self.prompt_tokens, self.gen_tokens = prompt_tokens, gen_tokens
        self.need_tps = budget.tokens_per_s / (1.0 - self.margin) if budget.tokens_per_s is not None else None
        self.need_ttft = budget.ttft_ms * (1.0 - self.margin) if budget.ttft_ms is not None else None
        self.candidates = [self._candidate(n) for n in range(dm.n_layers, 0, -1)]
        ok = [c for c in self.candidates if c["meets"]]
        if not ok:
            raise UserError(self._cannot_be_met())
        self.chosen = ok[0]
        self.chosen["verdict"] = (f"chosen: the most layers (least perplexity) predicted within {budget.describe()} "
                                  f"({self.chosen['predicted_tokens_per_s']:.4g} tok/s, TTFT "
                                  f"{self.chosen['predicted_ttft_ms']:.4g} ms predicted)")
        for c in ok[1:]:
            c["verdict"] += f"; not chosen: fewer layers than {self.chosen['layers']}"
        self.start = self.chosen_n = self.chosen["n_removed"]

    def _candidate(self, layers: int) -> dict[str, Any]:
        tps, ttft = self.dm.tokens_per_s(layers), self.dm.ttft_ms(layers)
        why = []
        if self.need_tps is not None and tps < self.need_tps:
            why.append(f"predicted {tps:.4g} tok/s < {self.need_tps:.4g} (budget / (1 - margin))")
        if self.need_ttft is not None and ttft > self.need_ttft:
            why.append(f"predicted TTFT {ttft:.4g} ms > {self.need_ttft:.4g} ms (budget x (1 - margin))")
        return {"layers": layers, "n_removed": self.dm.n_layers - layers, "precision": self.dm.precision,
                "predicted_tokens_per_s": tps, "predicted_ms_per_token": self.dm.ms_per_token(layers),
                "predicted_ttft_ms": ttft, "meets": not why,
                "verdict": "; ".join(why) if why else "meets the budget (predicted)"}

    def _cannot_be_met(self) -> str:
        fastest = self.candidates[-1]
        where = (f"on {self.profile.name}: the fastest candidate ({fastest['layers']} layer"
                 f"{'s' if fastest['layers'] != 1 else ''}, {fastest['precision']}) is predicted at")
        if self.need_tps is not None and fastest["predicted_tokens_per_s"] < self.need_tps:
            return (f"decode budget {self.budget.tokens_per_s:g} tok/s cannot be met {where} "
                    f"{fastest['predicted_tokens_per_s']:.4g} tok/s (with the {self.margin:g} margin it needs "
                    f"{self.need_tps:.4g}); lower --decode-budget, or pick a faster device or a lower-precision profile")
        return (f"TTFT budget {self.budget.ttft_ms:g} ms cannot be met {where} {fastest['predicted_ttft_ms']:.4g} ms "
                f"(with the {self.margin:g} margin it needs {self.need_ttft:.4g} ms); raise --ttft-budget, or pick a "
                "faster device or a shorter eval.prompt_tokens")

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
            "precision": self.profile.precision, "precisions": [self.profile.precision],
            "precision_note": "the profile's precision only (its compile stage builds that one)",
            "threads": self.profile.threads, "budget_tokens_per_s": b.tokens_per_s, "budget_ttft_ms": b.ttft_ms,
            "budget": b.describe(), "budget_source": b.source, "budget_ms": None, "margin": self.margin,
            "needed_tokens_per_s": self.need_tps, "needed_ttft_ms": self.need_ttft,
            "rounds": len((dm.points or [{}])[0].get("rounds_ms_per_token", [])),
            "n_layers": dm.n_layers, "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens,
            "predicted_full_tokens_per_s": dm.tokens_per_s(dm.n_layers), "candidates": self.candidates,
            "chosen": self.chosen, "why": self.chosen.get("verdict"), "decode_model": dm.to_dict(),
        }


def _err(pred: Any, meas: Any) -> Any:
    return abs(pred - meas) / meas if (pred is not None and meas) else None


def decode_search_report(search: dict[str, Any], report: dict[str, Any],
                         verification: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The plan's decode search with ``final_bench``: the run's benchmark of the fine-tuned network
    against the budget and the prediction. Beside the measured tokens/s, an anchored figure: the
    pruned / original tokens/s ratio x the decode model's full-depth prediction, i.e. the pruned
    model at the speed the decode model was measured at (a machine whose speed drifted moves both
    alike); the ratio is the median of the verification's alternating passes
    (:func:`sglp_edge.budget.decode_measure.verify_decode`), else the bench stage's single pair."""
    search = dict(search)
    for t in report.get("targets", []):
        if t.get("device") != search.get("device"):
            continue
        lm = t.get("lm") or {}
        p, o = lm.get("pruned") or {}, lm.get("original") or {}
        tps, ttft, otps = p.get("decode_tokens_per_s"), p.get("ttft_ms"), o.get("decode_tokens_per_s")
        ch, full = search.get("chosen") or {}, search.get("predicted_full_tokens_per_s")
        pair = (tps / otps) if (tps and otps) else None
        ratio = verification["ratio"] if verification else pair
        anch = ratio * full if (ratio is not None and full) else None
        cons = {c["metric"]: c for c in t.get("constraints", [])}
        bt, bf = search.get("budget_tokens_per_s"), search.get("budget_ttft_ms")
        search["final_bench"] = {
            "decode_tokens_per_s": tps, "predicted_tokens_per_s": ch.get("predicted_tokens_per_s"),
            "meets_decode_budget": (tps >= bt) if (tps is not None and bt is not None) else None,
            "prediction_error": _err(ch.get("predicted_tokens_per_s"), tps),
            "anchored_decode_tokens_per_s": anch, "anchored_prediction_error": _err(ch.get("predicted_tokens_per_s"), anch),
            "anchored_meets_decode_budget": (anch >= bt) if (anch is not None and bt is not None) else None,
            "ratio_to_original": ratio, "bench_pair_ratio": pair, "original_decode_tokens_per_s": otps,
            "speed_now_vs_fit": (otps / full) if (otps and full) else None, "verification": verification,
            "ttft_ms": ttft, "predicted_ttft_ms": ch.get("predicted_ttft_ms"),
            "meets_ttft_budget": (ttft <= bf) if (ttft is not None and bf is not None) else None,
            "ttft_prediction_error": _err(ch.get("predicted_ttft_ms"), ttft),
            "perplexity": p.get("perplexity"), "original_perplexity": o.get("perplexity"),
            "perplexity_increase_pct": (cons.get("perplexity_increase_pct") or {}).get("measured"),
            "note": "the run's benchmark of the fine-tuned network (the profile's bench settings), after the search; "
                    "anchored_* = the pruned / original tokens/s ratio (the median of the verification's alternating "
                    "passes; the bench stage's pair without one) x the decode model's full-depth prediction: the "
                    "pruned model at the speed the decode model was fitted at",
        }
        break
    return search


def decode_search_html(search: dict[str, Any]) -> dict[str, str]:
    """The decode search as a report.html section: budget, decode model, every layer count, the choice."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    dm = search.get("decode_model") or {}
    dec, tt = dm.get("decode") or {}, dm.get("ttft") or {}
    fb = search.get("final_bench") or {}
    pts = ", ".join(f"L{p['layers']} {p['ms_per_token']:.3g} ms/token" for p in dm.get("points") or [])
    rows = "".join(f"<tr><td>{f(c.get('layers'))}</td><td>{f(c.get('precision'))}</td>"
                   f"<td>{f(c.get('predicted_tokens_per_s'))}</td><td>{f(c.get('predicted_ttft_ms'))}</td>"
                   f"<td>{f(c.get('verdict'))}</td></tr>" for c in search.get("candidates", []))
    body = (f"<p>Budget {f(search.get('budget'))} on {f(search.get('device'))} ({f(search.get('budget_source'))}); "
            f"margin {f(search.get('margin'))}. Decode model on the device ({f(search.get('backend'))} "
            f"{f(search.get('precision'))}, prompt {f(search.get('prompt_tokens'))} + {f(search.get('gen_tokens'))} "
            f"tokens): ms/token = {f(dec.get('a_ms'))} + {f(dec.get('b_ms'))} x layers (R^2 {f(dec.get('r2'))}), TTFT "
            f"= {f(tt.get('a_ms'))} + {f(tt.get('b_ms'))} x layers ms (R^2 {f(tt.get('r2'))}), from {pts} "
            f"({f(search.get('rounds'))} alternating round(s); cached {f(dm.get('cached'))}). Chosen: "
            f"{f((search.get('chosen') or {}).get('layers'))} of {f(search.get('n_layers'))} layers. After the "
            f"fine-tune the run measured {f(fb.get('decode_tokens_per_s'))} tok/s (predicted "
            f"{f(fb.get('predicted_tokens_per_s'))}, error {f(fb.get('prediction_error'))}, within budget "
            f"{f(fb.get('meets_decode_budget'))}; anchored {f(fb.get('anchored_decode_tokens_per_s'))} tok/s at the "
            f"fit's speed: x {f(fb.get('ratio_to_original'))} of the original"
            f"{', the median of %d alternating passes' % fb['verification']['rounds'] if fb.get('verification') else ''}"
            f"; the machine now x {f(fb.get('speed_now_vs_fit'))} of the fit's speed) and TTFT {f(fb.get('ttft_ms'))} ms "
            f"(predicted {f(fb.get('predicted_ttft_ms'))}, within budget {f(fb.get('meets_ttft_budget'))}); "
            f"perplexity {f(fb.get('perplexity'))} against {f(fb.get('original_perplexity'))} unpruned.</p>"
            "<table id='decode-search'><tr><th>layers</th><th>precision</th><th>predicted tok/s</th>"
            f"<th>predicted TTFT ms</th><th>verdict</th></tr>{rows}</table>")
    return {"title": "Decode budget search (keep: auto)", "html": body}
