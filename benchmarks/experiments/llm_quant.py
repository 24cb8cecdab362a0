"""FP32 vs INT8 vs INT4 weight-only of one exported decoder LM, on ONNX Runtime and OpenVINO:
decode tokens/s (alternating rounds), TTFT, perplexity on held-out text and greedy agreement
with PyTorch. Host-side script; reads what ``benchmarks/experiments/llm_deploy.py`` wrote.

    python benchmarks/experiments/llm_quant.py --export runs/llm_deploy/onnx-22 [--rounds 3] [--threads 2]

``--export`` is a folder with ``model.onnx`` (text-generation-with-past) and ``lm_eval.npz`` (token
ids + PyTorch's greedy tokens and perplexity). Artifacts are compiled with
:func:`exporters.lm_compile.compile_lm` into ``<export>/compiled/<backend>-<precision>``.
Speed ratios against FP32 of the same runtime come from alternating rounds (robust to load from
other processes); absolute tokens/s are only meaningful on an otherwise idle machine.
The summary line is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchmarks.board.lm_bench as lm_bench  # noqa: E402
from exporters.lm_compile import compile_lm  # noqa: E402

# (backend, precision, ONNX Runtime MatMulNBits accuracy_level: None = compile_lm's default (4, int8
# compute), 0 = ORT's unset (fp32 compute), kept to show what the default buys)
VARIANTS = (("onnxruntime", "fp32", None), ("onnxruntime", "int8", None), ("onnxruntime", "int8", 0),
            ("onnxruntime", "int4", None), ("onnxruntime", "int4", 0),
            ("openvino", "fp32", None), ("openvino", "int8", None), ("openvino", "int4", None))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--reuse", action="store_true", help="keep artifacts compiled earlier")
    ap.add_argument("--gen", type=int, help="decode tokens per timed generation (default: the npz's gen_tokens)")
    ap.add_argument("--ppl-blocks", type=int, help="perplexity on the first N held-out blocks (default: all)")
    args = ap.parse_args(argv)

    data = lm_bench.load_eval_npz(str(args.export / "lm_eval.npz"))
    if args.gen:
        data["gen_tokens"] = args.gen
    if args.ppl_blocks:
        data["ppl_blocks"] = data["ppl_blocks"][: args.ppl_blocks]
    sessions, info = {}, {}
    for be, prec0, level in VARIANTS:
        prec = prec0 + (f"-acc{level}" if level is not None else "")  # the variant's name
        out = args.export / "compiled" / f"{be}-{prec}"
        art = out / ("model.xml" if be == "openvino" else "model.onnx")
        if not (args.reuse and art.is_file()):
            t0 = time.perf_counter()
            man = compile_lm(args.export / "model.onnx", be, prec0, out, group_size=args.group_size,
                             accuracy_level=level)
            print(f"compiled {be} {prec}: {man['size_bytes'] / 2**20:.1f} MB in {time.perf_counter() - t0:.0f} s; "
                  f"parity vs fp32 {man.get('parity')}", flush=True)
        sessions[(be, prec)] = lm_bench.LMSession(str(art), be, threads=args.threads)
        info[f"{be}/{prec}"] = {"size_mb": lm_bench.artifact_size(art) / 2**20}
    for k, s in sessions.items():
        q = info[f"{k[0]}/{k[1]}"]
        q["ppl"] = lm_bench.perplexity(s, data["ppl_blocks"])["perplexity"]
        g = lm_bench.greedy_agreement(s, data["greedy_prompts"], data["greedy_reference"])
        q["greedy_agree"] = g["agreement"]
        q["first_divergence"] = min((d["position"] for d in g["divergences"]), default=None)
        print(f"{k[0]} {k[1]}: ppl {q['ppl']:.3f} on {len(data['ppl_blocks'])} blocks, greedy agreement "
              f"{q['greedy_agree']:.3f}", flush=True)
    bp, gen = data["bench_prompt"], data["gen_tokens"]
    for s in sessions.values():
        lm_bench.generate(s, bp[:16], 8)
    tps = {k: [] for k in sessions}
    ttft = {k: [] for k in sessions}
    for r in range(args.rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))
        for k in order:
            g = lm_bench.generate(sessions[k], bp, gen)
            tps[k].append(len(g["step_s"]) / sum(g["step_s"]))  # llama-bench's tg: tokens / their time
            ttft[k].append(g["ttft_s"] * 1e3)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k[0]}/{k[1]} {tps[k][-1]:.1f}" for k in order), flush=True)
    print(f"{'backend':12s} {'prec':10s} {'size MB':>8s} {'tok/s':>7s} {'x fp32':>7s} {'TTFT ms':>8s} {'ppl':>9s} {'greedy':>7s}")
    for k in sessions:
        q = info[f"{k[0]}/{k[1]}"]
        ratio = statistics.median([a / b for a, b in zip(tps[k], tps[(k[0], "fp32")])])
        q.update(tokens_per_s=statistics.median(tps[k]), ttft_ms=statistics.median(ttft[k]), speedup_vs_fp32=ratio)
        print(f"{k[0]:12s} {k[1]:10s} {q['size_mb']:8.1f} {q['tokens_per_s']:7.1f} {ratio:7.2f} {q['ttft_ms']:8.1f} "
              f"{q['ppl']:9.3f} {q['greedy_agree']:7.3f}")
    info["loadavg"] = list(os.getloadavg())
    (args.export / "llm_quant.json").write_text(json.dumps(info, indent=2))
    o8, o4 = info["onnxruntime/int8"], info["onnxruntime/int4"]
    v8, v4 = info["openvino/int8"], info["openvino/int4"]
    print(f"llm_quant ort_int8_speedup={o8['speedup_vs_fp32']:.3f} ort_int4_speedup={o4['speedup_vs_fp32']:.3f} "
          f"openvino_int8_speedup={v8['speedup_vs_fp32']:.3f} openvino_int4_speedup={v4['speedup_vs_fp32']:.3f} "
          f"ppl_ort_fp32={info['onnxruntime/fp32']['ppl']:.3f} ppl_ort_int8={o8['ppl']:.3f} ppl_ort_int4={o4['ppl']:.3f} "
          f"ppl_openvino_int8={v8['ppl']:.3f} ppl_openvino_int4={v4['ppl']:.3f} loadavg={os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
