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
