"""A 1B-parameter decoder LM through analysis, pruning and export on this machine, measured.

The model is a Llama-3.2-1B-shaped Llama (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads,
tied embeddings, SmolLM2's tokenizer: 1.07e9 parameters, 4.3 GB FP32) with random weights, made
once into ``--model`` (``--make``; about 1 minute and 4.3 GB of disk). Each stage runs as its own
process, as a user runs it, and its peak RSS is read from the kernel (``wait4``):

1. ``sglp-edge prune MODEL --data text --keep 12 --accelerator ACC``: CKA + segment search
   (``plan.json`` gives the analysis time and the evaluations) and the removal, saved;
2. the export of the pruned model to our KV-cache ONNX graph (external data past 2 GB), with
   ONNX Runtime's logits compared with PyTorch's on a held-out block of the text data.

    python benchmarks/experiments/scale.py --make [--accelerator cpu] [--threads 2]

Host-side script (needs torch). The summary line is printed last:
``scale llama1b params=... layers=16->12 accelerator=... analysis_s=... evaluations=... peak_rss_gb=...
fp32_gb=... export_gb=... export_parity_max_abs=...``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                tie_word_embeddings=True, rope_theta=500000.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "scale" / "llama1b")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--make", action="store_true", help="make the random 1B model into --model when it is missing")
    ap.add_argument("--keep", type=int, default=12)
    ap.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stage", choices=("export",), help=argparse.SUPPRESS)  # internal: one stage in this process
    ap.add_argument("--pruned", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def make_model(folder: Path) -> None:
    """The random Llama-3.2-1B-shaped model with SmolLM2's tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_edge.models.hf_llm import load_hf

    free = shutil.disk_usage(folder.parent if folder.parent.exists() else ROOT).free
    if free < 12e9:
        sys.exit(f"error: {free / 1e9:.1f} GB free; the model (4.3 GB), the pruned copy and the export need about 12 GB")
    tok = load_hf("smollm2").tokenizer
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)


def run_stage(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` with its output into ``log``; (wall seconds, peak RSS in GB) of that process."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = log.read_text()[-3000:]
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {p.returncode}; see {log}\n{tail}")
    return wall, usage.ru_maxrss * 1024 / 1e9


def export_stage(pruned: Path, out: Path) -> None:
    """In its own process: the pruned model to the KV-cache ONNX graph, parity on a held-out block."""
    from sglp_edge.data.text import get_text_dataset
    from sglp_edge.export.lm import export_causal_lm
    from sglp_edge.models.hf_llm import load_hf

    loaded = load_hf(pruned)
    block = get_text_dataset(loaded.tokenizer, seed=0, block_size=64, max_tokens=200_000).split("test")[:1]
    meta = export_causal_lm(loaded.model, out, parity_ids=block.to("cpu").long())
    print(json.dumps({k: meta[k] for k in ("size_bytes", "external_data", "parity_vs_pytorch")}, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "export":
        export_stage(args.pruned, args.out)
        return 0
    if not (args.model / "config.json").is_file():
        if not args.make:
            sys.exit(f"error: no model at {args.model}; add --make to create the random 1B Llama there")
        print(f"making the random Llama-3.2-1B-shaped model into {args.model} ...", flush=True)
        make_model(args.model)
    cfg = json.loads((args.model / "config.json").read_text())
    params = _params(cfg)
    fp32_gb = params * 4 / 1e9
    args.work.mkdir(parents=True, exist_ok=True)
    pruned, onnx_dir = args.work / "pruned", args.work / "onnx"
    py = [sys.executable, "-m", "sglp_edge.cli"]
    prune_cmd = [*py, "prune", str(args.model), "--data", "text", "--keep", str(args.keep), "--out", str(pruned),
                 "--accelerator", args.accelerator, "--force"] + (["--threads", str(args.threads)] if args.threads else [])
    print("prune:", " ".join(prune_cmd[2:]), flush=True)
    prune_s, prune_rss = run_stage(prune_cmd, args.work / "prune.log")
    plan = json.loads((pruned / "plan.json").read_text())
    print(f"prune: {prune_s:.0f} s wall, peak RSS {prune_rss:.2f} GB; analysis {plan['wall_s']:.0f} s "
          f"(CKA {plan['timings'].get('cka_s', 0):.0f} s, candidates {plan['timings'].get('gradnorm_s', 0):.0f} s), "
          f"{plan['evaluations']} evaluations on {plan['accelerator']['device']} ({plan['accelerator']['dtype']}); "
          f"estimate said {plan.get('estimate', {}).get('seconds') or 0:.0f} s", flush=True)
    print(f"calibration: {plan['calibration']}", flush=True)
    print(f"kept: {plan['kept']}", flush=True)
    if onnx_dir.exists():
        shutil.rmtree(onnx_dir)
    export_cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", "export", "--pruned", str(pruned / "model"),
                  "--out", str(onnx_dir)]
    export_s, export_rss = run_stage(export_cmd, args.work / "export.log")
    meta = json.loads([ln for ln in (args.work / "export.log").read_text().splitlines() if ln.startswith("{")][-1])
    export_gb = meta["size_bytes"] / 1e9
    par = meta["parity_vs_pytorch"]
    max_abs = max(par.get("full_block_max_abs", 0.0), par["max_abs"])  # the worse of full block and prefill + decode
    print(f"export: {export_s:.0f} s wall, peak RSS {export_rss:.2f} GB, {export_gb:.2f} GB on disk "
          f"(external data: {meta['external_data']}); parity {par}", flush=True)
    peak = max(prune_rss, export_rss)
    print(f"checks: analysis {plan['wall_s']:.0f} s {'<=' if plan['wall_s'] <= 1200 else '>'} 1200 s; peak RSS "
          f"{peak:.2f} GB = {peak / fp32_gb:.2f} x FP32 ({'<=' if peak <= 2 * fp32_gb else '>'} 2); "
          f"parity passed={par.get('passed')}", flush=True)
    n_before = len(plan["kept"]) + len(plan["removed"])
    mant, exp = f"{params:.2e}".split("e")
    print(f"scale llama1b params={mant}e{int(exp)} layers={n_before}->{len(plan['kept'])} "
          f"accelerator={plan['accelerator']['device'].split(':')[0]} analysis_s={plan['wall_s']:.0f} "
          f"evaluations={plan['evaluations']} peak_rss_gb={peak:.2f} fp32_gb={fp32_gb:.1f} export_gb={export_gb:.2f} "
          f"export_parity_max_abs={max_abs:.3g}")
    return 0


def _params(cfg: dict) -> int:
    from sglp_edge.models.lm_memory import params_of

    nh = int(cfg["num_attention_heads"])
    return params_of({"hidden": int(cfg["hidden_size"]), "layers": int(cfg["num_hidden_layers"]),
                      "inter": int(cfg["intermediate_size"]), "vocab": int(cfg["vocab_size"]), "heads": nh,
                      "kv_heads": int(cfg.get("num_key_value_heads") or nh), "tied": bool(cfg.get("tie_word_embeddings"))})


if __name__ == "__main__":
    sys.exit(main())
