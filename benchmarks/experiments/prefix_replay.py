"""The segment-prefix replay changes no choice: SGLP's kept units with and without it.

For ResNet-56 (the shipped Fashion-MNIST model, keep 14 of 28) and SmolLM2-135M (30 -> 22 layers),
the analysis of ``sglp-edge prune`` (default settings: the ``loss`` score, 4 calibration batches,
the first one scored) runs twice, with ``prefix_cache`` off (every candidate a whole forward) and
on; it prints both kept lists, the candidate scores' largest difference and the selection time.

    python benchmarks/experiments/prefix_replay.py [--threads 2] [--only resnet56|smollm2]

Host-side script (needs torch). The summary line is printed last:
``prefix_replay resnet56_same=... smollm2_same=... max_score_diff=... speedup_resnet56=... speedup_smollm2=...``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sglp_edge import api  # noqa: E402
from sglp_edge.models.registry import load_model  # noqa: E402
from sglp_edge.pipeline.calibration import calibration_batches  # noqa: E402

CASES = {"resnet56": ("default", "fashion-mnist", 14), "smollm2": ("smollm2", "text", 22)}


def compare(name: str) -> dict:
    model, data, keep = CASES[name]
    loaded = load_model(model)
    cka_b = calibration_batches(loaded, data, n_batches=4, batch_size=0, seq_len=128, seed=0)
    plans = {}
    for on in (False, True):
        t = time.perf_counter()
        plans[on] = api.analyze(loaded.model, cka_b, grad_batches=cka_b[:1], adapter=loaded.adapter, keep=keep,
                                prefix_cache=on)
        p = plans[on]
        print(f"{name} prefix_cache={on}: {time.perf_counter() - t:.1f} s (selection "
              f"{p.timings['gradnorm_s']:.1f} s, {p.evaluations} evaluations, protocol {p.config['protocol']}, "
              f"replay {p.prefix_cache})", flush=True)
        print(f"  kept {p.kept}", flush=True)
    off, on = plans[False], plans[True]
    s_off = {(s["segment"], k): v for s in off.selections for k, v in s["scores"].items()}
    s_on = {(s["segment"], k): v for s in on.selections for k, v in s["scores"].items()}
    if s_off.keys() != s_on.keys():
        print(f"  the searches scored different candidates: {sorted(set(s_off) ^ set(s_on))[:4]}", flush=True)
    diff = max((abs(s_off[k] - s_on[k]) for k in s_off.keys() & s_on.keys()), default=float("nan"))
    return {"same": off.kept == on.kept and s_off.keys() == s_on.keys(), "diff": diff,
            "speedup": off.timings["gradnorm_s"] / on.timings["gradnorm_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", choices=sorted(CASES))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = {n: compare(n) for n in CASES if args.only in (None, n)}
    parts = [f"{n}_same={r['same']}" for n, r in res.items()]
    parts.append(f"max_score_diff={max(r['diff'] for r in res.values()):.3g}")
    parts += [f"speedup_{n}={r['speedup']:.2f}" for n, r in res.items()]
    print("prefix_replay " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
