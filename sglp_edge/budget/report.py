"""The latency-budget search as report.json shows it: the plan's search record (candidates,
predicted against measured p90, the chosen one and why) and what the run's own benchmark of the
fine-tuned network measured on the budget device afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
