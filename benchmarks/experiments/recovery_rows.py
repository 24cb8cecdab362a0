"""benchmarks/experiments/recovery.py bookkeeping, apart from the runs themselves: the per-row result cache
(a finished row is reused by a re-run with identical settings), the reuse of an earlier run's
pruned model, and the mean +- std table with the summary line's (SGLP, best other) pick.
Host-side, like recovery.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from sglp_edge.models.registry import load_model


def reuse_pruned(job, teacher_source: str | None = None):
    """The pruned model an earlier run of the same job already wrote to ``job.out`` (prune output is
    written atomically), as a stand-in for the prune job's result; None when there is none or its
    plan was made with other settings. Pruning does not depend on the fine-tune budget, so a row
    with another budget reuses the analysis (the expensive part for SLEB and the SGLP searches)."""
    plan_file = job.out / "plan.json"
    if not plan_file.is_file() or not (job.out / "model").is_dir():
        return None
    plan = json.loads(plan_file.read_text())
    cfg = plan.get("config", {})
    want = {"keep": job.keep, "method": job.method, "seed": job.seed, "heal": job.heal,
            "k_budget": job.k_budget, "eval_budget": job.eval_budget}
    if job.method == "sglp":  # the baselines do not read the protocol
        want["protocol"] = job.protocol
    if any(cfg.get(k) != v for k, v in want.items()) or plan.get("method") != job.method or job.grad_batches != 1:
        return None
    if job.method == "sglp" and (plan.get("allocation") or "proportional") != job.allocation:
        return None
    if plan.get("model_source") not in (job.model, teacher_source):
        return None
    print(f"  {job.method}: reusing the pruned model in {job.out} (same prune settings)", flush=True)
    return SimpleNamespace(pruned=load_model(str(job.out / "model")).model, plan=SimpleNamespace(**{
        k: plan.get(k) for k in ("removed", "macs_reduction", "params_reduction", "evaluations", "heal", "k")}))


def device_name(device: str | None) -> str:
    """What the fine-tune ran on, for the row's record (not part of the cache key: the recipe is
    the same; a GPU's kernels round differently, well inside the seed-to-seed spread)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _row_path(workdir: str, settings: dict) -> Path:
    import hashlib

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(workdir) / f"row-{settings['model']}-{settings['method']}-{key}.json"


def cached_row(workdir: str, settings: dict) -> dict | None:
    """A finished method's row from an earlier (possibly interrupted) run with identical settings."""
    p = _row_path(workdir, settings)
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    return d["row"] if d.get("settings") == settings else None


def save_row(workdir: str, settings: dict, row: dict) -> None:
    p = _row_path(workdir, settings)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "row": row}, indent=2))
    tmp.replace(p)


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def summarize(rows: list[dict], key: str, pruned_key: str) -> list[dict]:
    """Per method: mean and sample standard deviation over seeds, after KD and right after pruning."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        m, sd = _mean_std([r[key] for r in rs])
        pm, psd = _mean_std([r[pruned_key] for r in rs])
        out.append({"method": method, "seeds": sorted(r.get("seed", 0) for r in rs), "mean": m, "std": sd,
                    "pruned": pm, "pruned_std": psd, "removed": [r["removed"] for r in rs]})
    return out


def headline(stats: list[dict], higher: bool) -> tuple[dict, dict]:
    """(SGLP, best other method), each at its best healing setting (with or without '+heal'); the
    SGLP row is the default SGLP ('sglp' or 'sglp+heal'), not a protocol/allocation variant."""
    def better(a, b):
        return a if (a["mean"] > b["mean"]) == higher else b

    sg = [s for s in stats if s["method"] in ("sglp", "sglp+heal")]
    others = [s for s in stats if not s["method"].startswith("sglp")]
    if not sg:
        raise SystemExit("error: no SGLP row to compare")
    nan = {"method": "none", "mean": float("nan"), "std": float("nan"), "pruned": float("nan")}
    best_sg = sg[0] if len(sg) == 1 else better(sg[0], sg[1])
    best = nan
    for s in others:
        best = s if best is nan else better(s, best)
    return best_sg, best


def print_table(stats: list[dict], label: str, higher: bool) -> None:
    print(f"\n{'method':22s} {label + ' (pruned)':>26s} {label + ' (after KD)':>26s}  seeds")
    for s in sorted(stats, key=lambda s: s["mean"], reverse=higher):
        print(f"{s['method']:22s} {s['pruned']:15.2f} ± {s['pruned_std']:8.2f} {s['mean']:15.2f} ± {s['std']:8.2f}  "
              f"{','.join(map(str, s['seeds']))}")
    print()
