"""Assembly of ``report.json`` for ``sglp-edge run``: one entry per target with its constraints,
the figures measured on each model and where they came from (local, SSH board, emulated ARM, or
"not measured: needs the board")."""

from __future__ import annotations

import datetime
import json
from typing import Any

NEEDS_BOARD = "not measured: needs the board"


def build_report(pipe: Any, prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
    plan = json.loads((pipe.run_dir / "prune" / "plan.json").read_text())
    tg = []
    for board, comp, b in targets:
        res = {}
        for which in ("original", "pruned") if b.get("measured", True) else ():
            doc = json.loads((pipe.run_dir / b["stage"] / which / "result.json").read_text())
            m = doc.get("metrics", {})
            lat0 = (doc.get("latency") or [{}])[0]
            res[which] = {
                "latency_ms": {"p50": m.get("latency_p50_ms"), "p90": m.get("latency_p90_ms"),
                               "p99": m.get("latency_p99_ms"), "mean": m.get("latency_mean_ms"),
                               "std": lat0.get("std_ms")},
                "throughput_per_s": m.get("throughput_items_per_s"),
                "accuracy": {"top1": m.get("top1_pct")},
                "agreement": m.get("top1_agreement_pct"),
                "max_abs_vs_pytorch": ((doc.get("accuracy") or {}).get("agreement") or {}).get("max_abs_diff"),
                "size_mb": m.get("model_size_mb"), "peak_rss_mb": m.get("peak_memory_mb"),
                "precision_used": (doc.get("runtime") or {}).get("precision_used") or b["precision"],
                "raw_ms": lat0.get("raw_ms"), "target": doc.get("target"),
            }
        measured = b.get("measured", True)
        failed = any(c["passed"] is False for c in b["constraints"])
        passed = False if failed else (None if not measured else True)
        tg.append({"device": b["device"], "backend": b["backend"], "precision": b["precision"],
                   "threads": b["threads"], "passed": passed, "constraints": b["constraints"], "results": res,
                   "compile": comp, "target": b.get("target"), "measured": measured,
                   "needs_board": bool(b.get("needs_board")), "bundles": b.get("bundles"),
                   "board_files": b.get("board_files")})
    if any(t["passed"] is False for t in tg):
        overall = False
    elif any(t["needs_board"] for t in tg) or not tg:
        overall = None
    else:
        overall = True
    return {
        "title": f"sglp-edge run '{pipe.cfg.name}': {pipe.cfg.model} on {pipe.cfg.data}",
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "run_dir": str(pipe.run_dir),
        "model": pipe.cfg.model, "data": pipe.cfg.data, "config": pipe.cfg.model_dump(mode="json"),
        "passed": overall,
        "verdict": ("constraints NOT met" if overall is False else NEEDS_BOARD if tg and overall is None
                    else "every measured constraint met" if overall else "no constraints evaluated"),
        "prune": {k: v for k, v in plan.items() if k not in ("cka", "selections")},
        "cka_png": "prune/cka_heatmap.png" if (pipe.run_dir / "prune" / "cka_heatmap.png").is_file() else None,
        "finetune": ft, "export": ex,
        "torch_eval": {w: {"top1_pct": v} for w, v in (ev.get("torch_top1") or {}).items()},
        "targets": tg,
        "stages": {"ran": pipe.runner.ran, "skipped": pipe.runner.skipped},
    }
