"""Report assembly for a causal-LM run: the common report skeleton (constraints, pruning, CKA
heatmap), the LM figures per target (TTFT, decode tokens/s with p50/p90 per token, llama-bench
pp/tg, perplexity, greedy agreement, size, peak memory) and a tokens/s-vs-perplexity plot."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

from benchmarks.board.atomic import atomic_write_bytes

from sglp_edge.report.plots import scatter_png
from sglp_edge.report.render import fmt_cell

LM_COLUMNS = (("ttft_ms", "TTFT ms"), ("decode_tokens_per_s", "decode tok/s"), ("decode_p50_ms", "p50 ms/token"),
              ("decode_p90_ms", "p90 ms/token"), ("pp", "pp tok/s"), ("tg", "tg tok/s"), ("perplexity", "perplexity"),
              ("torch_perplexity", "PyTorch perplexity"), ("greedy_agreement_pct", "greedy agreement %"),
              ("model_size_mb", "size MB"), ("peak_memory_mb", "peak RSS MB"))


def _lm_row(doc: dict[str, Any]) -> dict[str, Any]:
    m = dict(doc.get("metrics") or {})
    lb = doc.get("llama_bench") or {}
    for k, v in lb.items():
        m["pp" if k.startswith("pp") else "tg"] = v
    m["llama_bench"] = lb
    m["precision_used"] = (doc.get("settings") or {}).get("inference_precision") or (doc.get("settings") or {}).get("precision")
    return m


def plot_tokens_ppl(targets: list[dict[str, Any]]) -> str | None:
    """Decode tokens/s against perplexity: original (o) and pruned (^) per backend and precision."""
    pts = []
    for t in targets:
        for which, marker in (("original", "o"), ("pruned", "^")):
            m = (t.get("lm") or {}).get(which) or {}
            if m.get("decode_tokens_per_s") and m.get("perplexity"):
                pts.append((f"{t['device']} {t['precision']}", which, marker, m["decode_tokens_per_s"], m["perplexity"]))
    return scatter_png(pts, xlabel="decode tokens/s (batch 1, greedy)", ylabel="perplexity on held-out text",
                       title="Tokens/s vs perplexity: original (o) and pruned (^)", log_y=True)


def lm_table_html(targets: list[dict[str, Any]]) -> str:
    rows = ["<table id='lm-results'><tr><th>device</th><th>model</th><th>backend</th><th>precision</th>"
            + "".join(f"<th>{h}</th>" for _, h in LM_COLUMNS) + "</tr>"]
    for t in targets:
        for which in ("original", "pruned"):
            m = (t.get("lm") or {}).get(which)
            if m:
                rows.append(f"<tr><td>{fmt_cell(t['device'])}</td><td>{which}</td><td>{fmt_cell(t['backend'])}</td>"
                            f"<td>{fmt_cell(t['precision'])}</td>" + "".join(f"<td>{fmt_cell(m.get(k))}</td>" for k, _ in LM_COLUMNS)
                            + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def build_lm_report(pipe: Any, prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
    plan = json.loads((pipe.run_dir / "prune" / "plan.json").read_text())
    tg = []
    for board, comp, b in targets:
        res, lm = {}, {}
        for which in ("original", "pruned"):
            doc = json.loads((pipe.run_dir / b["stage"] / which / "result.json").read_text())
            m = _lm_row(doc)
            lm[which] = m
            res[which] = {  # the common table: per-token decode latency, tokens/s as throughput
                "latency_ms": {"p50": m.get("decode_p50_ms"), "p90": m.get("decode_p90_ms")},
                "throughput_per_s": m.get("decode_tokens_per_s"), "accuracy": {"ppl": m.get("perplexity")},
                "agreement": m.get("greedy_agreement_pct"), "size_mb": m.get("model_size_mb"),
                "peak_rss_mb": m.get("peak_memory_mb"), "precision_used": m.get("precision_used"),
                "ttft_ms": m.get("ttft_ms"), "llama_bench": m.get("llama_bench")}
        passed = all(c["passed"] for c in b["constraints"] if c["passed"] is not None)
        tg.append({"device": b["device"], "backend": b["backend"], "precision": b["precision"], "threads": b["threads"],
                   "passed": passed, "constraints": b["constraints"], "results": res, "lm": lm, "compile": comp})
    cfg = pipe.cfg
    rep = {
        "title": f"sglp-edge run '{cfg.name}': {cfg.model} on {cfg.data} (causal LM)",
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "run_dir": str(pipe.run_dir),
        "task": "causal-lm", "model": cfg.model, "data": cfg.data, "config": cfg.model_dump(mode="json"),
        "passed": all(t["passed"] for t in tg) if tg else None,
        "prune": {k: v for k, v in plan.items() if k not in ("cka", "selections")},
        "cka_png": "prune/cka_heatmap.png" if (pipe.run_dir / "prune" / "cka_heatmap.png").is_file() else None,
        "finetune": ft, "export": ex,
        "torch_eval": {w: {"perplexity": v} for w, v in (ev.get("torch_ppl") or {}).items()},
        "lm_eval": {k: v for k, v in ev.items() if k != "torch_ppl"},
        "targets": tg,
        "stages": {"ran": pipe.runner.ran, "skipped": pipe.runner.skipped},
    }
    rep["extra_html"] = [{"title": "Decoder LM on each target (batch 1, greedy, KV cache)", "html": lm_table_html(tg)}]
    png = plot_tokens_ppl(tg)
    rep["extra_plots"] = []
    if png:
        atomic_write_bytes(pipe.run_dir / "tokens_vs_perplexity.png", base64.b64decode(png))
        rep["extra_plots"].append({"id": "plot-tokens-ppl", "caption": "Decode tokens/s vs perplexity (original o, "
                                   "pruned ^, per backend and precision)", "png": "tokens_vs_perplexity.png"})
    return rep
