"""On-board decoder-LM benchmark (numpy + the runtime only; Python 3.8+; no torch, no tokenizer).

    python -m benchmarks.board.lm_bench --artifact model.onnx --backend onnxruntime --data lm_eval.npz \\
        --threads 4 --out result.json
    python -m benchmarks.board.run_bench --task causal-lm ...      (same thing through the usual entry)

The artifact is a graph in Optimum's ``text-generation-with-past`` layout (``sglp_edge.export.lm``):
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` in;
``logits``, ``present.{i}.key/value`` out. ONNX Runtime runs the ``.onnx``; OpenVINO runs the
``.onnx`` or a compiled ``.xml`` (FP32/FP16/INT8/INT4 weights), including the stateful IR of
``sglp_edge.export.lm_openvino`` (``beam_idx`` input, KV cache as state, fused attention), which it
runs with an f32 KV cache unless ``--precision bf16``. ``--backend onnxruntime-genai`` runs a folder
of ``sglp_edge.export.lm_genai`` (``genai_config.json`` + the builder's graph) through
onnxruntime-genai's generator (:mod:`benchmarks.board.lm_genai`; batch 1), picked by default for such a folder.
``--backend llama.cpp`` (default for a ``.gguf``) measures a GGUF with llama.cpp's own tools instead of
this loop, into the same metrics (:mod:`benchmarks.board.lm_llama_cpp`).

The eval ``.npz`` (written on the host, :func:`write_eval_npz`) carries token ids:
``task`` = ``"causal-lm"``, ``bench_prompt`` (P,), ``gen_tokens`` (G), ``greedy_prompts`` (N, Pg),
``greedy_reference`` (N, Gg: PyTorch's greedy tokens), ``ppl_blocks`` (M, L: held-out text),
optionally ``torch_perplexity``, and for llama.cpp (which reads text) the text keys :data:`TEXT_KEYS`.

Measured (batch 1, greedy, our own decode loop):
- TTFT: prefill of the P-token prompt plus the first token's argmax, in ms;
- decode: G further tokens, one step each with the KV cache: tokens/s, p50/p90 ms per token;
- llama-bench terms: ``pp<P>`` = P / prefill seconds, ``tg<G>`` = decode tokens/s;
- perplexity of the artifact on the held-out blocks (full-sequence forward, empty past);
- greedy agreement with PyTorch: identical tokens position by position over N prompts, with the
  first divergence and the top-2 logit margin there (a near-tie explains a divergence);
- peak resident memory of this process and the artifact's size on disk.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a file: the bundle (or repository) root holds benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.board.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from benchmarks.board.backends import BACKENDS, ONNX_BACKEND, backend_for_file  # noqa: E402
from benchmarks.board.calib import read_npz  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402
from benchmarks.board.harness import capture_env, now_iso, peak_memory  # noqa: E402
from benchmarks.board.lm_genai import GenaiSession, genai_files, is_genai_folder  # noqa: E402
from benchmarks.board.lm_llama_cpp import measure as llama_cpp_measure  # noqa: E402

TASK = "causal-lm"
SCHEMA = "sglp-edge.lm-bench/1"
EVAL_KEYS = ("bench_prompt", "gen_tokens", "greedy_prompts", "greedy_reference", "ppl_blocks")
#: optional text of the eval data (the held-out blocks / prompts decoded on the host, re-tokenising to them)
TEXT_KEYS = ("ppl_text", "ppl_text_blocks", "ppl_text_torch_nll", "greedy_prompt_text", "greedy_reference_text",
             "greedy_text_index")
#: backends this benchmark runs (the registry's ``lm_session``: our decode loop on a graph, or genai's)
LM_BACKENDS = tuple(n for n, b in BACKENDS.items() if b.lm_session)


class LMSession:
    """One decoder graph with past on ONNX Runtime or OpenVINO: ``step(ids, past, start)``."""

    def __init__(self, artifact: str, backend: str, *, threads: Optional[int] = None, precision: str = "fp32",
                 device: str = "CPU", providers: Optional[List[str]] = None):
        self.backend = backend
        self.stateful = False
        self.artifact = Path(artifact)
        if not self.artifact.is_file():
            raise UserError(f"LM artifact not found: {artifact}")
        if backend == "onnxruntime":
            import onnxruntime as ort  # heavy: the runtime

            so = ort.SessionOptions()
            so.log_severity_level = 3
            if threads:
                so.intra_op_num_threads = int(threads)
                so.inter_op_num_threads = 1
            self._sess = ort.InferenceSession(str(self.artifact), so, providers=providers or ["CPUExecutionProvider"])
            ins = self._sess.get_inputs()
            self.input_names = [i.name for i in ins]
            self.output_names = [o.name for o in self._sess.get_outputs()]
            shape = ins[3].shape if len(ins) > 3 else None
            self.settings = {"providers": self._sess.get_providers(), "threads": threads}
        elif backend == "openvino":
            import openvino as ov  # heavy: the runtime

            core = ov.Core()
            model = core.read_model(str(self.artifact))
            self.stateful = len(model.get_sinks()) > 0  # sglp_edge.export.lm_openvino: KV cache as state
            cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                   # this CPU computes in bf16 by default; FP32 parity needs f32 explicitly
                   "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
            if self.stateful and precision != "bf16":
                cfg["KV_CACHE_PRECISION"] = "f32"  # the fused stateful attention keeps a u8 cache by default
            if threads:
                cfg["INFERENCE_NUM_THREADS"] = int(threads)
            self._compiled = core.compile_model(model, device, cfg)
            self._req = self._compiled.create_infer_request()
            self.input_names = [i.get_any_name() for i in self._compiled.inputs]
            self.output_names = [o.get_any_name() for o in self._compiled.outputs]
            ps = model.inputs[3].get_partial_shape() if len(model.inputs) > 3 else None
            shape = [d.get_length() if d.is_static else None for d in ps] if ps is not None else None
            self.settings = {"device": device, "threads": threads, "stateful": self.stateful,
                             "inference_precision": str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))}
            if self.stateful:
                kv = self._compiled.get_property("KV_CACHE_PRECISION")
                self.settings["kv_cache_precision"] = kv.to_string() if hasattr(kv, "to_string") else str(kv)
                if self.input_names != ["input_ids", "attention_mask", "position_ids", "beam_idx"]:
                    raise UserError(f"{artifact} is stateful but its inputs are {self.input_names}, not input_ids, "
                                    "attention_mask, position_ids, beam_idx; export it with sglp_edge.export.lm_openvino")
                self.n_past, self.kv_heads, self.head_dim = 0, None, None
                return
        else:
            raise UserError(f"LMSession runs an ONNX Runtime or OpenVINO graph, not {backend!r}")
        if self.input_names[:3] != ["input_ids", "attention_mask", "position_ids"] or not shape or len(shape) != 4:
            raise UserError(f"{artifact} is not in the text-generation-with-past layout (inputs "
                            f"{self.input_names[:4]}); export it with sglp_edge.export.lm")
        self.n_past = len(self.input_names) - 3
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def empty_past(self, batch: int = 1) -> List[np.ndarray]:
        if self.stateful:  # the cache lives in the infer request; step(.., start=0) resets it
            return []
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(self.n_past)]

    def step(self, ids: np.ndarray, past: List[np.ndarray], start: int) -> Tuple[np.ndarray, List[np.ndarray]]:
        b, t = ids.shape
        feed = {"input_ids": ids.astype(np.int64, copy=False),
                "attention_mask": np.ones((b, start + t), np.int64),
                "position_ids": np.arange(start, start + t, dtype=np.int64)[None, :].repeat(b, 0)}
        for name, arr in zip(self.input_names[3:], past):
            feed[name] = arr
        if self.backend == "onnxruntime":
            out = self._sess.run(None, feed)
            return out[0], out[1:]
        if self.stateful:
            if start == 0:
                self._req.reset_state()
            feed["beam_idx"] = np.arange(b, dtype=np.int32)
        res = self._req.infer(feed)
        out = [res[o] for o in self._compiled.outputs]
        return out[0], out[1:]


def open_session(artifact: str, backend: str, **kw: Any) -> Any:
    """LMSession, or for onnxruntime-genai a :class:`benchmarks.board.lm_genai.GenaiSession` (same ``step``):
    the backend registry's ``lm_session`` of ``backend``."""
    kind = BACKENDS[backend].lm_session if backend in BACKENDS else ""
    if kind == "genai":
        return GenaiSession(artifact, threads=kw.get("threads"))
    if kind == "graph":
        return LMSession(artifact, backend, **kw)
    if kind == "llama.cpp":
        raise UserError("llama.cpp has no step session: run() measures a GGUF with llama.cpp's own tools "
                        "(benchmarks/board/lm_llama_cpp.py)")
    raise UserError(f"the LM benchmark runs on {', '.join(LM_BACKENDS[:-1])} or {LM_BACKENDS[-1]}, not {backend!r} "
                    "(TensorRT: build the engine with the printed trtexec command)")


def default_backend(artifact: Path) -> str:
    """No --backend: a folder is the folder backend's (onnxruntime-genai); a file goes by its suffix to an
    LM backend, anything else to ONNX Runtime."""
    if artifact.is_dir():
        return next(n for n, b in BACKENDS.items() if b.folder_artifact and b.lm_session)
    try:
        backend = backend_for_file(artifact)
    except UserError:
        return ONNX_BACKEND
    return backend if BACKENDS[backend].lm_session else ONNX_BACKEND


def generate(sess: LMSession, prompt: np.ndarray, n_new: int) -> Dict[str, Any]:
    """Greedy: prefill ``prompt`` (P,), then ``n_new`` decode steps. Returns tokens (n_new + 1),
    prefill seconds (incl. the first argmax), per-step seconds, per-token top-2 margins."""
    ids = np.asarray(prompt, np.int64)[None, :]
    t0 = time.perf_counter()
    logits, past = sess.step(ids, sess.empty_past(1), 0)
    last = logits[0, -1]
    tok = int(last.argmax())
    ttft = time.perf_counter() - t0
    toks, steps, margins = [tok], [], [_margin(last)]
    pos = ids.shape[1]
    for _ in range(n_new):
        t1 = time.perf_counter()
        logits, past = sess.step(np.array([[tok]], np.int64), past, pos)
        last = logits[0, -1]
        tok = int(last.argmax())
        steps.append(time.perf_counter() - t1)
        toks.append(tok)
        margins.append(_margin(last))
        pos += 1
    return {"tokens": toks, "ttft_s": ttft, "step_s": steps, "margins": margins}


def _margin(logits: np.ndarray) -> float:
    top2 = np.partition(logits.astype(np.float64), -2)[-2:]
    return float(top2[1] - top2[0])


def perplexity(sess: LMSession, blocks: np.ndarray, progress: Any = None, first: int = 0) -> Dict[str, Any]:
    """exp(mean next-token NLL) over every block (full forward, empty past, batch 1). ``first``: score
    only the tokens after position ``first`` of each block (llama.cpp's ``llama-perplexity`` scores the
    second half of each chunk: ``first = block // 2``); 0 scores every token."""
    nll, n = 0.0, 0
    for i, blk in enumerate(np.asarray(blocks, np.int64)):
        if not 0 <= first < len(blk) - 1:
            raise UserError(f"perplexity: first={first} leaves no token to score in a block of {len(blk)}")
        logits, _ = sess.step(blk[None, :], sess.empty_past(1), 0)
        lg = logits[0, first:-1].astype(np.float64)
        mx = lg.max(-1, keepdims=True)
        lse = np.log(np.exp(lg - mx).sum(-1)) + mx[:, 0]
        nll += float((lse - lg[np.arange(len(lg)), blk[first + 1:]]).sum())
        n += len(lg)
        if progress:
            progress(i + 1, len(blocks))
    return {"perplexity": float(np.exp(nll / n)), "nll": nll / n, "tokens": n, "blocks": int(len(blocks)),
            "first": first}


def greedy_agreement(sess: LMSession, prompts: np.ndarray, reference: np.ndarray) -> Dict[str, Any]:
    """Fraction of greedy tokens identical to PyTorch's, position by position."""
    same, total, first = 0, 0, []
    for p, ref in zip(np.asarray(prompts), np.asarray(reference)):
        g = generate(sess, p, len(ref) - 1)
        got = np.asarray(g["tokens"][: len(ref)])
        eq = got == ref
        same += int(eq.sum())
        total += len(ref)
        if not eq.all():
            k = int(np.argmin(eq))
            first.append({"position": k, "top2_margin": g["margins"][k], "got": int(got[k]), "ref": int(ref[k])})
    return {"agreement": same / float(total), "tokens": total, "prompts": int(len(prompts)), "divergences": first}


def speed(sess: LMSession, prompt: np.ndarray, n_new: int, rounds: int = 3) -> Dict[str, Any]:
    """TTFT and decode speed: one short warm-up, then ``rounds`` full generations; medians."""
    generate(sess, prompt[: min(8, len(prompt))], 4)
    runs = [generate(sess, prompt, n_new) for _ in range(max(1, rounds))]
    ttft = float(np.median([r["ttft_s"] for r in runs]))
    per_tok = np.concatenate([np.asarray(r["step_s"]) for r in runs])
    tps = float(np.median([len(r["step_s"]) / sum(r["step_s"]) for r in runs])) if n_new else float("nan")
    p, g = len(prompt), n_new
    return {"prompt_tokens": p, "gen_tokens": g, "rounds": len(runs), "ttft_ms": ttft * 1e3,
            "decode_tokens_per_s": tps, "decode_p50_ms": float(np.percentile(per_tok, 50) * 1e3) if g else None,
            "decode_p90_ms": float(np.percentile(per_tok, 90) * 1e3) if g else None,
            "llama_bench": {f"pp{p}": p / ttft, f"tg{g}": tps},
            "ttft_ms_rounds": [r["ttft_s"] * 1e3 for r in runs],
            "decode_tokens_per_s_rounds": [len(r["step_s"]) / sum(r["step_s"]) for r in runs]}


def load_eval_npz(path: str) -> Dict[str, Any]:
    d = read_npz(path, what="LM eval data", fix="the LM eval data written on the host (write_eval_npz)")
    task = str(d["task"]) if "task" in d else None
    missing = [k for k in EVAL_KEYS if k not in d]
    if task != TASK or missing:
        raise UserError(f"{path} is not LM eval data (task={task!r}, missing {missing}); write it with "
                        "benchmarks.board.lm_bench.write_eval_npz")
    d["gen_tokens"] = int(d["gen_tokens"])
    return d


def write_eval_npz(path: str, *, bench_prompt: np.ndarray, gen_tokens: int, greedy_prompts: np.ndarray,
                   greedy_reference: np.ndarray, ppl_blocks: np.ndarray, torch_perplexity: Optional[float] = None,
                   meta: Optional[Dict[str, Any]] = None, text: Optional[Dict[str, Any]] = None) -> Path:
    """Host side: write the board's LM eval data atomically: token ids, and ``text`` (optional keys
    :data:`TEXT_KEYS`, for a runtime that reads text: llama.cpp; sglp_edge.tasks.lm_eval_text)."""
    arrays = {"task": np.array(TASK), "bench_prompt": np.asarray(bench_prompt, np.int64),
              "gen_tokens": np.array(int(gen_tokens)), "greedy_prompts": np.asarray(greedy_prompts, np.int64),
              "greedy_reference": np.asarray(greedy_reference, np.int64), "ppl_blocks": np.asarray(ppl_blocks, np.int64),
              "meta": np.array(json.dumps(meta or {}))}
    if torch_perplexity is not None:
        arrays["torch_perplexity"] = np.array(float(torch_perplexity))
    for k, v in (text or {}).items():
        if k not in TEXT_KEYS:
            raise ValueError(f"eval data text key {k!r} is not one of {TEXT_KEYS}")
        arrays[k] = np.asarray(v)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def artifact_size(path: Path) -> int:
    """Bytes on disk: the graph plus its weights (.bin next to an .xml, external data of an .onnx;
    model.onnx* of an onnxruntime-genai folder)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in genai_files(path))
    files = [path]
    if path.suffix == ".xml":
        files.append(path.with_suffix(".bin"))
    for extra in (Path(str(path) + ".data"), path.with_suffix(".onnx.data")):
        if extra not in files:
            files.append(extra)
    return sum(f.stat().st_size for f in files if f.is_file())


def measure_session(artifact: Path, data: Dict[str, Any], backend: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Our own decode loop on a graph or genai session: {"speed", "perplexity", "greedy", "memory", "settings"}."""
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if getattr(args, "providers", None) else None
    t0 = time.perf_counter()
    sess = open_session(str(artifact), backend, threads=args.threads, precision=getattr(args, "precision", "fp32"),
                        device=getattr(args, "device", "CPU"), providers=providers)
    load_s = time.perf_counter() - t0
    sp = speed(sess, data["bench_prompt"], data["gen_tokens"], rounds=getattr(args, "gen_rounds", 3) or 3)
    blocks = data["ppl_blocks"]
    if getattr(args, "max_eval", None):
        blocks = blocks[: args.max_eval]
    ppl = perplexity(sess, blocks)
    agree = greedy_agreement(sess, data["greedy_prompts"], data["greedy_reference"])
    return {"speed": sp, "perplexity": ppl, "greedy": agree, "memory": peak_memory(),
            "settings": dict(sess.settings, load_s=load_s)}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The whole LM benchmark; ``args`` as built by :func:`build_parser` (or run_bench's parser)."""
    if not args.data:
        raise UserError("the LM benchmark needs --data (the LM eval .npz with token ids, written on the host)")
    artifact = Path(args.artifact)
    if not artifact.is_file() and not is_genai_folder(artifact):
        raise UserError(f"artifact not found: {artifact}" + (" (a folder: only an onnxruntime-genai folder with "
                                                             "genai_config.json is an artifact)" if artifact.is_dir() else ""))
    data = load_eval_npz(args.data)
    backend = args.backend or default_backend(artifact)
    if backend in BACKENDS and BACKENDS[backend].lm_session == "llama.cpp":  # llama.cpp's own tools
        parts = llama_cpp_measure(artifact, data, threads=args.threads, rounds=getattr(args, "gen_rounds", 3) or 3,
                                  max_eval=getattr(args, "max_eval", None), llama_cpp=getattr(args, "llama_cpp", None))
    else:
        parts = measure_session(artifact, data, backend, args)
    sp, ppl, agree, mem = parts["speed"], parts["perplexity"], parts["greedy"], parts["memory"]
    size = artifact_size(artifact)
    metrics = {"ttft_ms": sp["ttft_ms"], "decode_tokens_per_s": sp["decode_tokens_per_s"],
               "decode_p50_ms": sp["decode_p50_ms"], "decode_p90_ms": sp["decode_p90_ms"],
               "perplexity": ppl["perplexity"],
               "greedy_agreement_pct": None if agree["agreement"] is None else 100.0 * agree["agreement"],
               "model_size_mb": size / float(1 << 20), "peak_memory_mb": mem["peak_rss_mb"]}
    if "torch_perplexity" in data:  # llama.cpp: PyTorch's, scored as llama-perplexity scores (or None)
        metrics["torch_perplexity"] = ppl.get("torch_perplexity", float(data["torch_perplexity"]))
    result = {"schema": SCHEMA, "status": "done", "task": TASK, "backend": backend, "finished_at": now_iso(),
              "artifact": {"name": artifact.name, "size_bytes": size, "size_mb": size / float(1 << 20)},
              "settings": dict(parts["settings"], precision=getattr(args, "precision", "fp32"), batch=1),
              "speed": sp, "perplexity": ppl, "greedy": agree,
              "llama_bench": sp["llama_bench"], "memory": mem, "metrics": metrics, "env": capture_env()}
    if getattr(args, "out", None):
        atomic_write_json(args.out, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.board.lm_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="text-generation-with-past .onnx, OpenVINO .xml, or an "
                   "onnxruntime-genai folder")
    p.add_argument("--backend", choices=list(LM_BACKENDS),
                   help="default: from the file suffix (a folder: onnxruntime-genai)")
    p.add_argument("--data", required=True, help="LM eval .npz (token ids; see write_eval_npz)")
    p.add_argument("--out", help="result JSON path")
    p.add_argument("--threads", type=int)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int4"],
                   help="recorded; OpenVINO computes in f32 unless bf16")
    p.add_argument("--device", default="CPU")
    p.add_argument("--providers")
    p.add_argument("--gen-rounds", type=int, default=3, help="timed generations (median)")
    p.add_argument("--max-eval", type=int, help="perplexity on the first N held-out blocks only")
    p.add_argument("--llama-cpp", help="llama.cpp tree with build/bin (backend llama.cpp; default "
                   "$SGLP_EDGE_LLAMA_CPP, else ~/.cache/sglp-edge/llama.cpp)")
    return p


def _nan(v: Optional[float]) -> float:
    return float("nan") if v is None else v


def summary(res: Dict[str, Any]) -> str:
    m = res["metrics"]
    lb = " ".join(f"{k}={v:.1f}" for k, v in res["llama_bench"].items())
    return ("done: {} TTFT {:.1f} ms, decode {:.1f} tok/s (p50 {:.2f} ms, p90 {:.2f} ms), {}, ppl {:.3f}, "
            "greedy {:.1f} %, peak RSS {:.0f} MB, size {:.1f} MB").format(
        res["backend"], m["ttft_ms"], m["decode_tokens_per_s"], m["decode_p50_ms"] or float("nan"),
        m["decode_p90_ms"] or float("nan"), lb, _nan(m["perplexity"]), _nan(m["greedy_agreement_pct"]),
        m["peak_memory_mb"] or float("nan"), m["model_size_mb"])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stderr.write(summary(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
