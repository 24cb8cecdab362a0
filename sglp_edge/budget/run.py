"""``keep: auto`` inside ``sglp-edge run``: what the prune stage needs (the budget device, the
bench and export settings, all part of the stage's input hash), the precision a decode budget chose
handed to the compile and bench stages (:func:`decode_precision`), and the search as report.json
shows it: the plan's search record (candidates, predicted against measured p90, the one chosen
and why) with what the run's own benchmark of the fine-tuned network measured afterwards."""

from __future__ import annotations

import html
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from benchmarks.board.backends import get_backend

from sglp_edge.budget.decode_report import decode_search_html, decode_search_report
from sglp_edge.budget.decode_search import LM_TASK
from sglp_edge.profiles.load import ENV_VAR, load_profile
from sglp_edge.targets.factory import make_target


def prune_settings(cfg: Any, bench: dict[str, Any], log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """PruneJob fields for ``keep: auto`` and the extra prune-stage inputs. The budget is the first
    device's (several devices at once: not yet)."""
    boards = cfg.boards()
    dev = boards[0].device
    if len(boards) > 1 and log:
        log(f"keep: auto: the latency budget is searched on {dev}, the first device; the others "
            f"({', '.join(b.device for b in boards[1:])}) get the same model and are checked against their own "
            "constraints (one model for the tightest of several budgets, or --per-device, is not yet available)")
    more = dict(device=dev, bench=bench, export_opset=cfg.export.opset, export_simplify=cfg.export.simplify, log=log)
    extra = {"budget_device": load_profile(dev).model_dump(mode="json"), "bench": bench,
             "export": cfg.export.model_dump()}
    if cfg.task == LM_TASK:  # a decode budget (sglp_edge.budget.decode_search), timed at the run's eval lengths
        lengths = dict(lm_prompt_tokens=cfg.eval.prompt_tokens, lm_gen_tokens=cfg.eval.gen_tokens)
        more.update(budget_kind="decode", **lengths)
        extra["decode_lengths"] = lengths
    return more, extra


def _is_path(device: str) -> bool:
    return device.endswith((".yaml", ".yml")) or os.sep in device or bool(os.altsep and os.altsep in device)


@contextmanager
def decode_precision(run_dir: Path, board: Any, log: Any = None) -> Iterator[Any]:
    """The board the compile and bench stages of ``board`` get: ``board`` itself, unless the run's
    decode budget (``prune/plan.json``) chose for its profile a precision other than the profile's.
    Then a copy of the profile with ``precision`` replaced, written to
    ``.work/decode-precision/<name>.yaml``, is what those stages load: found first by name
    (``SGLP_EDGE_DEVICES``, while they run), or for a profile given as a path, the board names the copy."""
    plan = Path(run_dir) / "prune" / "plan.json"
    search = (json.loads(plan.read_text()).get("search") or {}) if plan.is_file() else {}
    prof = load_profile(board.device) if search.get("kind") == "decode" else None
    chosen = search.get("precision")
    if prof is None or search.get("device") != prof.name or not chosen or chosen == prof.precision:
        yield board
        return
    folder = Path(run_dir) / ".work" / "decode-precision"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{prof.name}.yaml"
    doc = {**prof.model_dump(mode="json", exclude={"extends"}), "precision": chosen}
    copy.write_text(f"# {prof.name} at the precision chosen by the decode budget ({chosen}; the profile's: "
                    f"{prof.precision})\n" + yaml.safe_dump(doc, sort_keys=False))
    if log:
        log(f"{prof.name}: precision chosen by the decode budget: {chosen} (the profile's: {prof.precision}); the "
            "compile and bench stages build and measure that one")
    if _is_path(board.device):
        yield board.model_copy(update={"device": str(copy)})
        return
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = os.pathsep.join([str(folder)] + ([old] if old else []))
    try:
        yield board
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


#: alternating passes of the final check (original and pruned artifacts of the budget device)
VERIFY_ROUNDS = 5


def verify_final(run_dir: Path, search: dict[str, Any], bench: dict[str, Any], *, rounds: int = VERIFY_ROUNDS,
                 log: Any = None) -> dict[str, Any] | None:
    """The run's compiled ``original`` and ``pruned`` artifacts of the budget device timed in
    ``rounds`` alternating passes (the run's bench settings): per-pass p90s and ratios, the median
    ratio and the anchored p90 (ratio x the latency model's unpruned p90). One pass of each, as the
    bench stage takes, moved the ratio from 0.46 to 0.82 on this 2-core VM; the median of five is
    what the verdict uses. None when the artifacts are not there."""
    from sglp_edge.budget.latency_model import time_artifacts  # heavy: torch; pipeline.run imports this module

    if search.get("kind") == "decode":  # a causal LM: decode tokens/s in alternating passes
        from sglp_edge.budget.decode_measure import verify_decode  # heavy: torch; pipeline.run imports this module

        return verify_decode(run_dir, search, bench, rounds=rounds, log=log)
    prof = load_profile(search["device"])
    d = Path(run_dir) / f"compile-{prof.backend}-{prof.precision}"
    arts = {w: d / w / get_backend(prof.backend).artifact for w in ("original", "pruned")}
    if not all(a.is_file() for a in arts.values()):
        return None
    ov = {k: v for k, v in bench.items() if k not in ("max_eval", "eval_batch")}
    with tempfile.TemporaryDirectory(prefix="sglp-verify-") as t:
        r = time_artifacts(make_target(prof), prof, {"pruned": arts["pruned"]}, Path(t), rounds=rounds, overrides=ov,
                           reference=arts["original"], log=log)["pruned"]
    full = search.get("anchor_full_p90_ms")
    return {"rounds": rounds, "ratios": r["rounds_ratio"], "ratio": r["ratio"], "pruned_p90_ms": r["rounds_p90_ms"],
            "original_p90_ms": r["reference_rounds_p90_ms"], "measured_p90_ms": r["ratio"] * full if full else None}


def search_report(plan_json: Path, report: dict[str, Any], verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan's search record with ``final_bench``: the run's own benchmark of the fine-tuned
    network against the budget. That stage times the ``original`` and the ``pruned`` artifact one
    after the other, so besides their raw p90 it gives an anchored one, ``pruned / original x`` the
    latency model's unpruned p90 (the figure the budget and the predictions rest on); the verdict
    and the prediction error are given on both, the anchored ones first."""
    search = dict(json.loads(Path(plan_json).read_text()).get("search") or {})
    if not search:
        return {}
    if search.get("kind") == "decode":
        return decode_search_report(search, report, verification)
    for t in report.get("targets", []):
        if t.get("device") != search.get("device"):
            continue
        cons = {c["metric"]: c for c in t.get("constraints", [])}
        raw = (cons.get("latency_p90_ms") or {}).get("measured")
        res = t.get("results") or {}
        orig = ((res.get("original") or {}).get("latency_ms") or {}).get("p90")
        pr = ((res.get("pruned") or {}).get("latency_ms") or {}).get("p90")
        full = search.get("anchor_full_p90_ms")
        pair = (pr / orig) if (pr and orig) else None
        ratio = verification["ratio"] if verification else pair
        anch = ratio * full if (ratio is not None and full) else None
        pred = (search.get("chosen") or {}).get("predicted_p90_ms")

        def err(m: Any) -> Any:
            return abs(pred - m) / m if (m and pred is not None) else None

        search["final_bench"] = {
            "latency_p90_ms": anch, "meets_budget": (anch <= search["budget_ms"]) if anch is not None else None,
            "prediction_error": err(anch), "ratio_to_original": ratio, "original_p90_ms": orig,
            "anchor_full_p90_ms": full, "raw_latency_p90_ms": raw,
            "raw_meets_budget": (raw <= search["budget_ms"]) if raw is not None else None,
            "raw_prediction_error": err(raw),
            "bench_pair_ratio": pair, "verification": verification,
            "accuracy_drop_pct": (cons.get("accuracy_drop_pct") or {}).get("measured"),
            "accuracy_constraint_passed": (cons.get("accuracy_drop_pct") or {}).get("passed"),
            "note": "the run's benchmark of the fine-tuned network (the profile's bench settings), after the search; "
                    "latency_p90_ms is anchored: the pruned / original p90 ratio x anchor_full_p90_ms (the latency "
                    "model's unpruned p90), the ratio being the median of the verification's alternating passes "
                    "(bench_pair_ratio, the bench stage's single pair, when there is no verification); raw_* are "
                    "the bench stage's own milliseconds",
        }
        break
    return search


def search_html(search: dict[str, Any]) -> dict[str, str]:
    """The search as a report.html section: budget, latency model, every candidate, the choice."""
    if search.get("kind") == "decode":
        return decode_search_html(search)

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    lm = search.get("latency_model") or {}
    val = lm.get("validation") or {}
    fb = search.get("final_bench") or {}
    rows = "".join(f"<tr><td>{f(c.get('kept'))}</td><td>{f(c.get('n_removed'))}</td><td>{f(c.get('predicted_p90_ms'))}</td>"
                   f"<td>{f(c.get('measured_p90_ms'))}</td><td>{f(c.get('raw_p90_ms'))}</td><td>{f(c.get('reference_p90_ms'))}</td>"
                   f"<td>{f(c.get('ratio'))}</td><td>{f(c.get('verdict'))}</td></tr>"
                   for c in search.get("candidates", []))
    body = (f"<p>Budget {f(search.get('budget_ms'))} ms p90 on {f(search.get('device'))} ({f(search.get('budget_source'))}); "
            f"margin {f(search.get('margin'))}: predicted target {f(search.get('predicted_target_ms'))} ms; "
            f"{f(search.get('rounds'))} measured round(s) of at most {f(search.get('max_rounds'))}. Latency model: "
            f"{f(lm.get('constant_ms'))} ms + unit costs over {len(lm.get('groups') or [])} group(s), validation on "
            f"{f(val.get('subsets'))} unseen subsets: mean error {f(val.get('mean_rel_error'))}, max "
            f"{f(val.get('max_rel_error'))}. Measured p90 is <em>anchored</em>: the network's p90 over the unpruned "
            f"network's p90 timed alongside, times the latency model's unpruned p90 ({f(search.get('anchor_full_p90_ms'))}"
            " ms), so a machine whose speed drifts does not move it. After the fine-tune the run measured "
            f"p90 {f(fb.get('latency_p90_ms'))} ms anchored (x {f(fb.get('ratio_to_original'))} of the original"
            f"{', the median of %d alternating passes' % fb['verification']['rounds'] if fb.get('verification') else ''}, "
            f"prediction error {f(fb.get('prediction_error'))}, within budget {f(fb.get('meets_budget'))}); raw "
            f"{f(fb.get('raw_latency_p90_ms'))} ms against the original's {f(fb.get('original_p90_ms'))} ms (raw "
            f"prediction error {f(fb.get('raw_prediction_error'))}).</p>"
            "<table id='latency-search'><tr><th>kept</th><th>removed</th><th>predicted p90 ms</th>"
            "<th>measured p90 ms (anchored)</th><th>raw p90 ms</th><th>unpruned p90 ms alongside</th><th>ratio</th>"
            f"<th>verdict</th></tr>{rows}</table>")
    return {"title": "Latency budget search (keep: auto)", "html": body}
