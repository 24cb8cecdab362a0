"""``keep: auto`` inside ``sglp-edge run``: what the prune stage needs (the budget device, the
bench and export settings, all part of the stage's input hash), and the search as report.json
shows it: the plan's search record (candidates, predicted against measured p90, the one chosen
and why) with what the run's own benchmark of the fine-tuned network measured afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def prune_settings(cfg: Any, bench: dict[str, Any], log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """PruneJob fields for ``keep: auto`` and the extra prune-stage inputs. The budget is the first
    device's (several devices at once: not yet)."""
    from ..profiles import load_profile

    dev = cfg.boards()[0].device
    more = dict(device=dev, bench=bench, export_opset=cfg.export.opset, export_simplify=cfg.export.simplify, log=log)
    return more, {"budget_device": load_profile(dev).model_dump(mode="json"), "bench": bench,
                  "export": cfg.export.model_dump()}


def search_report(plan_json: Path, report: dict[str, Any]) -> dict[str, Any]:
    search = dict(json.loads(Path(plan_json).read_text()).get("search") or {})
    if not search:
        return {}
    for t in report.get("targets", []):
        if t.get("device") != search.get("device"):
            continue
        cons = {c["metric"]: c for c in t.get("constraints", [])}
        p90 = (cons.get("latency_p90_ms") or {}).get("measured")
        chosen = search.get("chosen") or {}
        search["final_bench"] = {
            "latency_p90_ms": p90,
            "meets_budget": (p90 <= search["budget_ms"]) if p90 is not None else None,
            "prediction_error": (abs(chosen["predicted_p90_ms"] - p90) / p90) if (p90 and chosen) else None,
            "accuracy_drop_pct": (cons.get("accuracy_drop_pct") or {}).get("measured"),
            "accuracy_constraint_passed": (cons.get("accuracy_drop_pct") or {}).get("passed"),
            "note": "the run's benchmark of the fine-tuned network (the profile's bench settings), after the search",
        }
        break
    return search


def search_html(search: dict[str, Any]) -> dict[str, str]:
    """The search as a report.html section: budget, latency model, every candidate, the choice."""
    import html

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    lm = search.get("latency_model") or {}
    val = lm.get("validation") or {}
    fb = search.get("final_bench") or {}
    rows = "".join(f"<tr><td>{f(c.get('kept'))}</td><td>{f(c.get('n_removed'))}</td><td>{f(c.get('predicted_p90_ms'))}</td>"
                   f"<td>{f(c.get('measured_p90_ms'))}</td><td>{f(c.get('verdict'))}</td></tr>"
                   for c in search.get("candidates", []))
    body = (f"<p>Budget {f(search.get('budget_ms'))} ms p90 on {f(search.get('device'))} ({f(search.get('budget_source'))}); "
            f"margin {f(search.get('margin'))}: predicted target {f(search.get('predicted_target_ms'))} ms; "
            f"{f(search.get('rounds'))} measured round(s) of at most {f(search.get('max_rounds'))}. Latency model: "
            f"{f(lm.get('constant_ms'))} ms + unit costs over {len(lm.get('groups') or [])} group(s), validation on "
            f"{f(val.get('subsets'))} unseen subsets: mean error {f(val.get('mean_rel_error'))}, max "
            f"{f(val.get('max_rel_error'))}. After the fine-tune the run's benchmark measured p90 "
            f"{f(fb.get('latency_p90_ms'))} ms (prediction error {f(fb.get('prediction_error'))}).</p>"
            "<table id='latency-search'><tr><th>kept</th><th>removed</th><th>predicted p90 ms</th>"
            f"<th>measured p90 ms</th><th>verdict</th></tr>{rows}</table>")
    return {"title": "Latency budget search (keep: auto)", "html": body}
