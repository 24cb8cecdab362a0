"""The run report: ``report.json`` (every figure, every constraint with measured value, limit and
pass/fail), ``report.html`` (self-contained: tables plus embedded PNG plots) and a terminal summary.

Schema of the report dict (what the pipeline fills in)::

    {"title", "created", "run_dir", "model", "data", "passed": bool | None,
     "prune": {plan summary: method, units/params/MACs before/after, kept, removed, k, segments, ...},
     "cka_png": "<file name in the run folder or null>",
     "torch_eval": {"original": {"top1": ..}, "pruned": {"top1": ..}},
     "targets": [                                   # one per device profile
        {"device", "backend", "precision", "threads", "passed",
         "results": {"original": BENCH, "pruned": BENCH},   # BENCH: latency_ms{p50,p90,p99,mean,std},
                                                           # throughput_per_s, accuracy{top1|ppl},
                                                           # agreement, size_mb, peak_rss_mb, raw_ms
         "constraints": [{"metric", "op", "limit", "measured", "passed", "note"}]}]}
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.board.atomic import atomic_write_json, atomic_write_text

from sglp_edge.report.plots import figure_png, pyplot, scatter_png


def plot_units(report: dict[str, Any]) -> str | None:
    units = (report.get("prune") or {}).get("units")
    if not units:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(units) + 2), 3.2))
    macs = [u.get("macs", 0) / 1e6 for u in units]
    colors = ["#8d99ae" if not u["removable"] else ("#2a9d8f" if u["kept"] else "#e76f51") for u in units]
    ax.bar(range(len(units)), macs, color=colors)
    ax.set_xticks(range(len(units)))
    ax.set_xticklabels([u["name"] for u in units], rotation=90, fontsize=7)
    ax.set_ylabel("MMACs")
    ax.set_title("Layer units: kept (green), removed (red); grey units cannot be removed (kept)", fontsize=9)
    return figure_png(fig)


def plot_latency(report: dict[str, Any]) -> str | None:
    targets = [t for t in report.get("targets", []) if t.get("results")]
    series = []
    for t in targets:
        for which in ("original", "pruned"):
            r = t["results"].get(which) or {}
            raw = r.get("raw_ms")
            if raw:
                series.append((f"{t['device']}\n{which}", raw))
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(series) + 2), 3.6))
    ax.boxplot([s[1] for s in series], showfliers=True, whis=(1, 99))
    ax.set_xticks(range(1, len(series) + 1))
    ax.set_xticklabels([s[0] for s in series], fontsize=7)
    ax.set_ylabel("latency per batch (ms)")
    ax.set_title("Latency distribution (whiskers: p1-p99)", fontsize=9)
    return figure_png(fig)


def plot_acc_latency(report: dict[str, Any]) -> str | None:
    pts = []
    for t in report.get("targets", []):
        for which, marker in (("original", "o"), ("pruned", "^")):
            r = (t.get("results") or {}).get(which) or {}
            acc = (r.get("accuracy") or {}).get("top1")
            p50 = (r.get("latency_ms") or {}).get("p50")
            if acc is not None and p50 is not None:
                pts.append((t["device"], which, marker, p50, 100 * acc if acc <= 1 else acc))
    return scatter_png(pts, xlabel="p50 latency (ms)", ylabel="top-1 of the compiled artifact (%)",
                       title="Accuracy vs latency: original (o) and pruned (^) per target")


def fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render_html(report: dict[str, Any], run_dir: Path) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report.get('title', 'sglp-edge report'))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f0f0f0}"
        ".pass{background:#d8f3dc}.fail{background:#ffccd5}.na{background:#eee}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(report.get('title', 'sglp-edge report'))}</h1>",
    ]
    verdict = report.get("passed")
    parts.append(f"<p id='verdict' class='{'pass' if verdict else 'fail' if verdict is False else 'na'}'>"
                 f"Overall: <b>{html.escape(report.get('verdict') or ('all constraints met' if verdict else 'constraints NOT met' if verdict is False else 'no constraints evaluated'))}</b>"
                 f" &mdash; model <code>{html.escape(str(report.get('model')))}</code>, data "
                 f"<code>{html.escape(str(report.get('data')))}</code>, created {html.escape(str(report.get('created')))}</p>")
    # constraints
    parts.append("<h2>Constraints</h2><table id='constraints'><tr><th>device</th><th>backend</th><th>precision</th>"
                 "<th>metric</th><th>limit</th><th>measured</th><th>result</th></tr>")
    for t in report.get("targets", []):
        for c in t.get("constraints", []):
            cls = "pass" if c.get("passed") else "fail" if c.get("passed") is False else "na"
            parts.append(f"<tr class='{cls}'><td>{fmt_cell(t['device'])}</td><td>{fmt_cell(t.get('backend'))}</td>"
                         f"<td>{fmt_cell(t.get('precision'))}</td><td>{fmt_cell(c['metric'])}</td><td>{fmt_cell(c.get('op'))} {fmt_cell(c['limit'])}</td>"
                         f"<td>{fmt_cell(c.get('measured'))}</td><td>{fmt_cell(c.get('passed')) if c.get('passed') is not None else fmt_cell(c.get('note') or 'not measured')}</td></tr>")
    parts.append("</table>")
    # prune summary
    pr = report.get("prune") or {}
    if pr:
        parts.append("<h2>Pruning</h2><table id='prune'>")
        for key in ("method", "n_units_before", "n_units_after", "params_before", "params_after", "macs_before",
                    "macs_after", "macs_reduction", "k", "evaluations", "wall_s"):
            if key in pr:
                parts.append(f"<tr><th>{key}</th><td>{fmt_cell(pr[key])}</td></tr>")
        parts.append(f"<tr><th>removed</th><td>{fmt_cell(', '.join(pr.get('removed', [])))}</td></tr></table>")
    te = report.get("torch_eval") or {}
    if te:
        parts.append("<h2>PyTorch accuracy (held-out)</h2><table id='torch-eval'><tr><th>model</th><th>metric</th><th>value</th></tr>")
        for which, m in te.items():
            for k, v in (m or {}).items():
                parts.append(f"<tr><td>{fmt_cell(which)}</td><td>{fmt_cell(k)}</td><td>{fmt_cell(v)}</td></tr>")
        parts.append("</table>")
    # per target results
    parts.append("<h2>Measured on each target</h2><table id='results'><tr><th>device</th><th>model</th><th>backend</th>"
                 "<th>precision used</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>mean ms</th><th>throughput/s</th>"
                 "<th>top-1 %</th><th>top-1 agreement with PyTorch %</th><th>size MB</th><th>peak RSS MB</th></tr>")
    for t in report.get("targets", []):
        for which in ("original", "pruned"):
            r = (t.get("results") or {}).get(which)
            if not r:
                continue
            lat = r.get("latency_ms") or {}
            parts.append(
                f"<tr><td>{fmt_cell(t['device'])}</td><td>{which}</td><td>{fmt_cell(t.get('backend'))}</td>"
                f"<td>{fmt_cell(r.get('precision_used'))}</td><td>{fmt_cell(lat.get('p50'))}</td><td>{fmt_cell(lat.get('p90'))}</td>"
                f"<td>{fmt_cell(lat.get('p99'))}</td><td>{fmt_cell(lat.get('mean'))}</td><td>{fmt_cell(r.get('throughput_per_s'))}</td>"
                f"<td>{fmt_cell((r.get('accuracy') or {}).get('top1'))}</td><td>{fmt_cell(r.get('agreement'))}</td>"
                f"<td>{fmt_cell(r.get('size_mb'))}</td><td>{fmt_cell(r.get('peak_rss_mb'))}</td></tr>")
    parts.append("</table>")
    for sec in report.get("extra_html") or []:  # task-specific tables (e.g. the LM figures)
        parts.append(f"<h2>{html.escape(sec['title'])}</h2>{sec['html']}")
    parts.append("<h2>Plots</h2>")
    for p in report.get("extra_plots") or []:  # task-specific plots, PNG files in the run folder
        if p.get("png") and (run_dir / p["png"]).is_file():
            b64 = base64.b64encode((run_dir / p["png"]).read_bytes()).decode()
            parts.append(f"<figure><img class='plot' id='{html.escape(p['id'])}' alt='{html.escape(p['caption'])}' "
                         f"src='data:image/png;base64,{b64}'><figcaption>{html.escape(p['caption'])}</figcaption></figure>")
    cka = report.get("cka_png")
    if cka and (run_dir / cka).is_file():
        b64 = base64.b64encode((run_dir / cka).read_bytes()).decode()
        parts.append(f"<figure><img class='plot' id='plot-cka' alt='CKA heatmap with segments' src='data:image/png;base64,{b64}'>"
                     "<figcaption>CKA between layer units with the Fisher segments</figcaption></figure>")
    for pid, fn, cap in (("plot-units", plot_units, "Layers kept"), ("plot-latency", plot_latency, "Latency distribution"),
                         ("plot-acc-latency", plot_acc_latency, "Accuracy vs latency")):
        b64 = fn(report)
        if b64:
            parts.append(f"<figure><img class='plot' id='{pid}' alt='{cap}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{cap}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict[str, Any], run_dir: Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    js = atomic_write_json(run_dir / "report.json", report)
    ht = atomic_write_text(run_dir / "report.html", render_html(report, run_dir))
    return js, ht


def print_summary(report: dict[str, Any]) -> None:
    table = Table(title="sglp-edge: constraints per target")
    for col in ("device", "backend", "metric", "limit", "measured", "result"):
        table.add_column(col)
    for t in report.get("targets", []):
        for c in t.get("constraints", []):
            ok = c.get("passed")
            res = "[green]PASS[/]" if ok else "[red]FAIL[/]" if ok is False else f"[yellow]{c.get('note') or 'not measured'}[/]"
            meas = c.get("measured")
            table.add_row(t["device"], str(t.get("backend")), c["metric"], f"{c.get('op', '')} {c['limit']}",
                          "-" if meas is None else f"{meas:.4g}" if isinstance(meas, float) else str(meas), res)
    Console(stderr=False).print(table)
