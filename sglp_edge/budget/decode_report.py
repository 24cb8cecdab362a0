"""The decode budget's search as report.json and report.html show it: the plan's search record
(:meth:`sglp_edge.budget.decode_search.DecodeSearch.record`: every (layers, precision) candidate,
the one chosen and why) with what the run's own benchmark of the fine-tuned network measured."""

from __future__ import annotations

import html
from typing import Any, Optional


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
    """The decode search as a report.html section: budget, decode model of the chosen precision, every
    (layers, precision) candidate, the choice."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    dm = search.get("decode_model") or {}
    dec, tt = dm.get("decode") or {}, dm.get("ttft") or {}
    fb = search.get("final_bench") or {}
    pts = ", ".join(f"L{p['layers']} {p['ms_per_token']:.3g} ms/token" for p in dm.get("points") or [])
    rows = "".join(f"<tr><td>{f(c.get('layers'))}</td><td>{f(c.get('precision'))}</td>"
                   f"<td>{f(c.get('predicted_tokens_per_s'))}</td><td>{f(c.get('predicted_ttft_ms'))}</td>"
                   f"<td>{f(c.get('q'))}</td><td>{f(c.get('predicted_perplexity'))}</td><td>{f(c.get('meets'))}</td>"
                   f"<td>{f(c.get('verdict'))}</td></tr>" for c in search.get("candidates", []))
    chosen_p, prof_p = search.get("precision"), search.get("profile_precision") or search.get("precision")
    prec = (f" Precision chosen by the decode budget: {f(chosen_p)} (profile precision {f(prof_p)}; searched "
            f"{f(', '.join(search.get('precisions') or []))}); the run compiled and benchmarked {f(chosen_p)}."
            if chosen_p != prof_p else
            f" Precisions searched: {f(', '.join(search.get('precisions') or []))}; chosen: {f(chosen_p)}, the profile precision.")
    body = (f"<p>Budget {f(search.get('budget'))} on {f(search.get('device'))} ({f(search.get('budget_source'))}); "
            f"margin {f(search.get('margin'))}. Decode model on the device ({f(search.get('backend'))} "
            f"{f(search.get('precision'))}, prompt {f(search.get('prompt_tokens'))} + {f(search.get('gen_tokens'))} "
            f"tokens): ms/token = {f(dec.get('a_ms'))} + {f(dec.get('b_ms'))} x layers (R^2 {f(dec.get('r2'))}), TTFT "
            f"= {f(tt.get('a_ms'))} + {f(tt.get('b_ms'))} x layers ms (R^2 {f(tt.get('r2'))}), from {pts} "
            f"({f(search.get('rounds'))} alternating round(s); cached {f(dm.get('cached'))}). Chosen: "
            f"{f((search.get('chosen') or {}).get('layers'))} of {f(search.get('n_layers'))} layers.{prec} After the "
            f"fine-tune the run measured {f(fb.get('decode_tokens_per_s'))} tok/s (predicted "
            f"{f(fb.get('predicted_tokens_per_s'))}, error {f(fb.get('prediction_error'))}, within budget "
            f"{f(fb.get('meets_decode_budget'))}; anchored {f(fb.get('anchored_decode_tokens_per_s'))} tok/s at the "
            f"fit's speed: x {f(fb.get('ratio_to_original'))} of the original"
            f"{', the median of %d alternating passes' % fb['verification']['rounds'] if fb.get('verification') else ''}"
            f"; the machine now x {f(fb.get('speed_now_vs_fit'))} of the fit's speed) and TTFT {f(fb.get('ttft_ms'))} ms "
            f"(predicted {f(fb.get('predicted_ttft_ms'))}, within budget {f(fb.get('meets_ttft_budget'))}); "
            f"perplexity {f(fb.get('perplexity'))} against {f(fb.get('original_perplexity'))} unpruned.</p>"
            "<table id='decode-search'><tr><th>layers</th><th>precision</th><th>predicted tok/s</th>"
            "<th>predicted TTFT ms</th><th>q(p): perplexity x of fp32 (device)</th><th>predicted perplexity</th>"
            f"<th>feasible</th><th>verdict</th></tr>{rows}</table>")
    return {"title": "Decode budget search (keep: auto)", "html": body}
