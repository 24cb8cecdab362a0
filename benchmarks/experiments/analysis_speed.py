"""Time the full SGLP analysis of ResNet-56 on this CPU and count GradNorm evaluations.

Target: under 60 s and at most 1/10 of the reference code's 2,040 GradNorm evaluations, with the
exhaustive choice reproduced on every beam-searched segment small enough to check.

    python benchmarks/experiments/analysis_speed.py [--keep 14] [--threads 2]

Host-side script (needs torch). The summary line is printed last.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sglp_edge.models.registry import DEFAULT_MODEL, load_model  # noqa: E402
from sglp_edge.pipeline.calibration import calibration_batches  # noqa: E402
from sglp_edge.sglp.importance import CandidateScorer, select_in_segment  # noqa: E402
from sglp_edge.sglp.plan import PruneConfig  # noqa: E402
from sglp_edge.sglp.prune import analyze  # noqa: E402

REFERENCE_EVALUATIONS = 2040  # reference code: C(n, r) per segment, summed over its hand-set partition


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, default=14, help="units to keep (the reference keeps 14 of 28)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--check-limit", type=int, default=1000,
                    help="check beam-searched segments against exhaustive search up to this many combinations")
    ap.add_argument("--protocol", default="natural")
    ap.add_argument("--eval-budget", type=int, default=80, help="GradNorm evaluations over all segments")
    ap.add_argument("--window", type=int, default=8,
                    help="for segments too large to check, check the budgeted search on windows of this many units")
    return ap.parse_args(argv)


def load_resnet56(threads: int):
    """The trained default when shipped, else a randomly initialised ResNet-56; prints which."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if (DEFAULT_MODEL / "sglp_model.json").is_file():
        loaded = load_model("default")
        which = "trained default (Fashion-MNIST)"
    else:
        torch.manual_seed(0)
        loaded = load_model("cifar_resnet56")
        which = "randomly initialised (the trained default is not shipped yet)"
    print(f"model: ResNet-56, {which}; torch threads: {torch.get_num_threads()}")
    return loaded


def check_windows(scorer, sel: dict, args: argparse.Namespace, direction: str) -> tuple[int, int]:
    """The same budgeted search on windows of a segment too large to check whole; (checked, agreed)."""
    checked = agreed = 0
    n, r = len(sel["units"]), len(sel["keep"])
    # The same budgeted search on windows of the segment (same keep fraction, the budget scaled to
    # the window as the segment's share was to the segment) against exhaustive search there.
    w = min(args.window, n)
    rw = max(1, min(w - 1, round(w * r / n)))
    share = max(w, round(sel["evaluations"] * w / n))
    for start in range(0, n - w + 1, w):
        win = sel["units"][start:start + w]
        ex = select_in_segment(scorer, sel["segment"], win, rw, exhaustive_budget=args.check_limit)
        bud = select_in_segment(scorer, sel["segment"], win, rw, exhaustive_budget=1, max_evaluations=share,
                                direction=direction)
        checked += 1
        same = ex.keep == bud.keep
        agreed += same
        print(f"    window {win[0]}..{win[-1]} keep {rw}: {bud.method} ({share} evaluations allowed) vs exhaustive over "
              f"{math.comb(w, rw)} -> {'same choice' if same else 'DIFFERENT'}")
    return checked, agreed


def check_selections(loaded, plan, grad_b, cfg: PruneConfig, args: argparse.Namespace) -> tuple[int, int]:
    """Each beam-searched segment (or its windows) against exhaustive search; prints a line each."""
    checked = agreed = 0
    scorer = CandidateScorer(loaded.model, loaded.adapter, grad_b, protocol=args.protocol, seed=cfg.seed)
    direction = "down" if args.protocol == "natural" else "auto"
    for sel in plan.selections:
        n, r = len(sel["units"]), len(sel["keep"])
        line = f"  segment {sel['segment']}: {n} removable, keep {r}, {sel['method']}, {sel['evaluations']} evaluations"
        if sel["method"] in ("exhaustive", "trivial"):
            print(line)
            continue
        if math.comb(n, r) <= args.check_limit:
            ex = select_in_segment(scorer, sel["segment"], sel["units"], r, exhaustive_budget=args.check_limit)
            checked += 1
            same = ex.keep == sel["keep"]
            agreed += same
            line += f"; exhaustive over {math.comb(n, r)} -> {'same choice' if same else 'DIFFERENT: ' + str(ex.keep)}"
            print(line)
            continue
        print(line + f"; too large to check whole (C({n},{r}) = {math.comb(n, r)}), checking windows of {args.window}")
        c, a = check_windows(scorer, sel, args, direction)
        checked += c
        agreed += a
    return checked, agreed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_resnet56(args.threads)
    model, adapter = loaded.model, loaded.adapter

    t0 = time.perf_counter()
    cka_b = calibration_batches(loaded, "fashion-mnist", n_batches=4, batch_size=128, seq_len=0, seed=0)
    grad_b = cka_b[:1]
    cfg = PruneConfig(keep=args.keep, protocol=args.protocol, eval_budget=args.eval_budget)
    plan = analyze(model, adapter, cka_b, grad_b, cfg)
    wall = time.perf_counter() - t0
    n_units = plan.n_units_before

    print(f"units={n_units} kept={plan.n_units_after} k={plan.k} ({plan.k_chosen_by}) segments={plan.segments}")
    print(f"timings: {', '.join(f'{k}={v:.2f}' for k, v in plan.timings.items())}, total wall {wall:.2f} s "
          "(calibration data loading included)")
    print(f"MACs reduction {plan.macs_reduction:.3f}, params reduction {plan.params_reduction:.3f}")
    checked, agreed = check_selections(loaded, plan, grad_b, cfg, args)
    print(f"exhaustive check: {agreed}/{checked} budget-searched segments or windows reproduce the exhaustive choice "
          f"(segments searched exhaustively need no check)")
    ok_time = wall < 60.0
    ok_evals = plan.evaluations * 10 <= REFERENCE_EVALUATIONS
    print(f"targets: wall < 60 s: {'met' if ok_time else 'MISSED'}; evaluations <= {REFERENCE_EVALUATIONS // 10}: "
          f"{'met' if ok_evals else 'MISSED'}")
    print(f"analysis resnet56 units={n_units} wall_s={wall:.2f} evaluations={plan.evaluations} "
          f"reference_evaluations={REFERENCE_EVALUATIONS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
