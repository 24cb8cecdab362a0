"""Decoder-LM export for onnxruntime-genai: its model builder's graph, genai_config.json, tokenizer.

A third LM deploy route beside :mod:`sglp_edge.export.lm` (plain ONNX, our own decode loop) and
:mod:`sglp_edge.export.lm_openvino` (stateful OpenVINO IR). onnxruntime-genai's model builder
(``onnxruntime_genai.models.builder``) rewrites a saved Hugging Face causal LM into ONNX Runtime's
own fused operators (GroupQueryAttention with a shared KV buffer, SkipSimplifiedLayerNorm, rotary
caches; optional MatMulNBits int8/int4 weights) and writes the ``genai_config.json`` that
``onnxruntime_genai.Model`` loads. The graph runs on ONNX Runtime only (its contrib operators),
through onnxruntime-genai's generator, which has aarch64 wheels.

Folder (``export_causal_lm_genai(src, out)``; ``src`` is a ``save_pretrained`` folder with tokenizer
files, e.g. the pruned model that ``sglp-edge prune`` / :func:`sglp_edge.models.hf_llm.save_hf` wrote):

    model.onnx (+ model.onnx.data)  genai_config.json  tokenizer.json  tokenizer_config.json  lm.json

Proof of the export (``lm.json``, ``parity_vs_pytorch``): for each parity prompt, onnxruntime-genai's
own greedy search (``og.Generator``, ``do_sample=False``, ``generate_next_token``) against
transformers' ``generate`` (greedy, same end-of-sequence ids), and the largest absolute difference
of the prefill logits (``generator.get_output("logits")``) from transformers' forward. FP32 must be
identical (``passed``); int8/int4 record their agreement without requiring it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.board.atomic import atomic_dir, sha256_file
from benchmarks.board.lm_genai import GENAI_CONFIG, open_model
from benchmarks.board.errors import UserError

from sglp_edge.export.lm import META_FILE, PARITY_ATOL, TASK, peak_rss_bytes
from sglp_edge.export.awq import awq_scale
from sglp_edge.models.hf_llm import save_hf

LAYOUT = "onnxruntime-genai"
PRECISIONS = ("fp32", "int8", "int4")
INSTALL = "pip install 'onnxruntime-genai>=0.18' 'onnx-ir>=1.0' (or: pip install 'sglp-edge[llm]')"
#: config.architectures[0] this route was checked on (tests: tiny random models; SmolLM2-135M by hand)
TESTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
#: what onnxruntime-genai 0.18's builder also converts; the parity check decides whether it worked
BUILDER_ARCHITECTURES = TESTED_ARCHITECTURES + (
    "MistralForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM",
    "GraniteForCausalLM", "OlmoForCausalLM", "SmolLM3ForCausalLM", "NemotronForCausalLM")
#: ONNX Runtime's CPU GroupQueryAttention (the builder's attention) refuses other head sizes at run time
GQA_HEAD_MULTIPLE = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
#: parity prompts (text); random ids when the folder's tokenizer does not cover them
PARITY_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ")


def require_genai() -> Any:
    """``onnxruntime_genai`` and its builder's dependency, or a one-line UserError naming the install."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise UserError(f"the onnxruntime-genai route needs the onnxruntime-genai package ({e}): {INSTALL}") from None
    return og


def check_source(src: str | Path) -> dict[str, Any]:
    """``config.json`` of a saved causal LM the builder can convert, or a one-line UserError."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not src.is_dir() or not cfg_path.is_file():
        raise UserError(f"{src} is not a saved Hugging Face model folder (no config.json); save the model with "
                        "save_pretrained / sglp_edge.models.hf_llm.save_hf, or pass the prune output's model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path} is unreadable ({type(e).__name__}); re-save the model") from None
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in BUILDER_ARCHITECTURES:
        raise UserError(f"onnxruntime-genai's builder does not convert {arch} (model_type {cfg.get('model_type')!r}); "
                        f"supported: {', '.join(BUILDER_ARCHITECTURES)}. Use the ONNX route: sglp-edge export")
    try:
        head = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        head = None
    if head is not None and head % GQA_HEAD_MULTIPLE:
        raise UserError(f"onnxruntime-genai's CPU attention (GroupQueryAttention) needs a head size that is a multiple "
                        f"of {GQA_HEAD_MULTIPLE}; {src.name} has {head} (hidden_size / num_attention_heads). Use the "
                        "ONNX route: sglp-edge export, or an onnxruntime / openvino profile")
    if not any((src / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"{src} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); the genai folder ships one: "
                        "save the tokenizer next to the model (save_hf(..., tokenizer=tok))")
    return cfg


def build(src: Path, out: Path, precision: str, *, extra_options: Sequence[str] = ()) -> str:
    """Run onnxruntime-genai's builder (its Python API: parse_extra_options + create_model) from ``src``
    into the existing empty folder ``out``; returns the builder's printed log. CPU execution provider."""
    try:
        from onnxruntime_genai.models import builder as ob
    except ImportError as e:
        raise UserError(f"onnxruntime-genai's model builder does not import ({e}): {INSTALL}") from None
    if not (hasattr(ob, "parse_extra_options") and hasattr(ob, "create_model")):
        raise UserError("this onnxruntime-genai has no builder parse_extra_options/create_model API; "
                        "install onnxruntime-genai 0.18 (pip install 'onnxruntime-genai>=0.18,<0.19')")
    cache = Path(tempfile.mkdtemp(prefix=".genai-cache.", dir=out.parent))
    log = io.StringIO()
    quiet = logging.getLogger("onnxruntime.quantization")  # int8/int4: one INFO line per MatMul
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            opts = ob.parse_extra_options(None, str(src), str(out), precision, "cpu", str(cache),
                                          list(extra_options) + ["hf_token=false"])
            ob.create_model(None, str(src), str(out), precision, "cpu", str(cache), **opts)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the builder raises bare Exception / NotImplementedError
        tail = " ".join(str(e).split())[:300]
        raise UserError(f"onnxruntime-genai's builder failed on {src} ({type(e).__name__}: {tail}); "
                        "use the ONNX route (sglp-edge export)") from None
    finally:
        quiet.setLevel(level)
        shutil.rmtree(cache, ignore_errors=True)
    if not (out / GENAI_CONFIG).is_file() or not (out / "model.onnx").is_file():
        raise UserError(f"onnxruntime-genai's builder wrote no model.onnx / {GENAI_CONFIG} for {src}")
    return log.getvalue()


#: the builder's INT4: k-quant, the LM head at 8 bits, and llama.cpp's mixed strategy (Q4_K_M): the first
#: and last eighth of the layers and every third layer's qkv / v / down projections at 8 bits. On the
#: pruned SmolLM2 (groups of 32, AWQ-scaled) it costs +7.3 % perplexity over FP32, against +10.6 % with
#: the head alone at 8 bits (benchmarks/results/lm-deploy.md)
BUILDER_LOWBIT = ("algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8")
#: every decoder MatMul at 4 bits, only the head at 8: faster, less exact
BUILDER_LOWBIT_PLAIN = ("algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8")
#: INT4 group size the AWQ search rounds with: the builder's own default block
GENAI_INT4_GROUP = 32


def build_quantized(src: Path, out: Path, precision: str, *, extra_options: Sequence[str] = (),
                    calib_ids: Any = None, log: Any = None,
                    group_size: int = GENAI_INT4_GROUP) -> tuple[str, dict[str, Any] | None]:
    """The builder's folder in ``precision``: (its log, the quantization record). INT4: the builder's
    k-quant INT4 with the LM head at INT8; with calibration blocks the model's weights are first
    AWQ-scaled on them (sglp_edge.export.awq: same function in float, less rounding error), in a
    temporary copy of ``src``. INT8: the builder's round-to-nearest (8 bits lose next to nothing)."""
    if precision == "fp32":
        return build(src, out, precision, extra_options=extra_options), None
    opts = list(extra_options) or list(BUILDER_LOWBIT if precision == "int4" else ())
    if precision == "int4" and group_size != GENAI_INT4_GROUP and not extra_options:
        opts.append(f"block_size={group_size}")
    rec: dict[str, Any] = {"method": f"onnxruntime-genai builder MatMulNBits {precision}"
                                     + (f" ({', '.join(opts)})" if opts else " (round-to-nearest)"),
                           "bits": 4 if precision == "int4" else 8, "awq": None}
    if precision != "int4" or calib_ids is None:
        return build(src, out, precision, extra_options=opts), rec
    from transformers import AutoModelForCausalLM  # heavy: transformers

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="float32", trust_remote_code=False).eval()
    rec["awq"] = awq_scale(model, calib_ids, bits=4, group_size=group_size, log=log)
    rec["method"] = "AWQ scales (calibrated) + " + rec["method"]
    scaled = Path(tempfile.mkdtemp(prefix=".awq.", dir=out.parent))
    try:
        save_hf(model, scaled, tokenizer=_tokenizer(src))
        return build(scaled, out, precision, extra_options=opts), rec
    finally:
        shutil.rmtree(scaled, ignore_errors=True)


def _tokenizer(src: Path) -> Any:
    from transformers import AutoTokenizer  # heavy: transformers

    return AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)


def genai_greedy(og: Any, model: Any, prompt: Sequence[int], n_new: int) -> tuple[list[int], Any]:
    """onnxruntime-genai's own greedy search: (new tokens, prefill logits (P, vocab)). It stops early at
    an end-of-sequence id of genai_config.json, as transformers' ``generate`` does with the same ids."""
    import numpy as np

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n_new, batch_size=1)
    try:
        gen = og.Generator(model, params)
    except RuntimeError as e:  # e.g. an EOS id outside the vocabulary in genai_config.json
        raise UserError(f"onnxruntime-genai cannot run the exported model ({' '.join(str(e).split())[:200]}); "
                        "check the source folder's config.json / tokenizer special tokens") from None
    gen.append_tokens(np.asarray(prompt, np.int32)[None, :])
    logits = np.array(gen.get_output("logits"), np.float32)[0]
    while not gen.is_done():
        gen.generate_next_token()
    toks = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
    del gen, params
    return toks, logits


def parity_prompts(src: Path, vocab: int) -> list[list[int]]:
    """The parity prompts as token ids: PARITY_PROMPTS through the folder's tokenizer, or seeded
    random ids when it maps them to fewer than 4 distinct tokens (toy tokenizers of test models)."""
    import numpy as np

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
        ids = [list(tok(p, add_special_tokens=False).input_ids) for p in PARITY_PROMPTS]
        if all(len(set(i)) >= 4 and max(i) < vocab for i in ids):
            return ids
    except Exception:  # noqa: BLE001 - any tokenizer trouble: random ids are still a valid check
        pass
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, 8).tolist(), rng.integers(0, vocab, 11).tolist()]


def genai_parity(folder: Path, src: Path, precision: str, *, n_new: int = 16,
                 prompts: Sequence[Sequence[int]] | None = None, threads: int | None = None,
                 reference_model: Any = None) -> dict[str, Any]:
    """Greedy tokens of onnxruntime-genai (``folder``) against transformers (``src``, or
    ``reference_model`` when the caller holds it: not loaded a second time), and the prefill logits'
    max abs difference, per prompt. Every PyTorch reference is computed first and the model loaded
    from ``src`` freed before onnxruntime-genai loads its own copy of the weights. ``passed``: every
    token identical and logits within PARITY_ATOL (fp32); for int8/int4 ``passed`` is None (recorded,
    not required)."""
    import numpy as np

    og = require_genai()
    cfg = json.loads((folder / GENAI_CONFIG).read_text())
    eos = cfg.get("model", {}).get("eos_token_id")
    eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])] if eos is not None else None
    refs, prompts = _torch_references(src, prompts, n_new, eos, reference_model)
    model = open_model(og, folder, threads=threads)
    rows, same, total, max_abs, max_ref = [], 0, 0, 0.0, 0.0
    for p, (ref_logits, ref) in zip(prompts, refs):
        got, logits = genai_greedy(og, model, p, n_new)
        d = float(np.abs(logits - ref_logits).max()) if logits.shape == ref_logits.shape else float("inf")
        max_abs, max_ref = max(max_abs, d), max(max_ref, float(np.abs(ref_logits).max()))
        n = max(len(got), len(ref))
        eq = [i < len(got) and i < len(ref) and got[i] == ref[i] for i in range(n)]
        same += sum(eq)
        total += n
        rows.append({"prompt_tokens": len(p), "genai": got, "transformers": ref, "identical": all(eq),
                     "first_difference": None if all(eq) else eq.index(False), "prefill_max_abs": d})
    del model
    identical = all(r["identical"] for r in rows)
    return {"runtime": f"onnxruntime-genai {getattr(og, '__version__', '?')} cpu, {precision}",
            "reference": "transformers generate (greedy, fp32)", "prompts": len(rows), "new_tokens": n_new,
            "eos_token_id": eos, "greedy_agreement": same / float(max(total, 1)), "greedy_equal": identical,
            "max_abs": max_abs, "max_ref": max_ref, "per_prompt": rows,
            "passed": bool(identical and max_abs <= PARITY_ATOL) if precision == "fp32" else None}


def _torch_references(src: Path, prompts: Sequence[Sequence[int]] | None, n_new: int, eos: list[int] | None,
                      ref_model: Any = None) -> tuple[list[tuple[Any, list[int]]], list[list[int]]]:
    """((prefill logits (P, vocab), greedy tokens) per prompt, the prompts) from transformers, fp32; the
    model is loaded from ``src`` unless given, and a loaded one is freed before returning."""
    import torch  # heavy: torch
    from transformers import AutoModelForCausalLM  # heavy: transformers

    loaded = ref_model is None
    if loaded:
        ref_model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, trust_remote_code=False)
    was_training = ref_model.training
    ref_model.eval()
    try:
        vocab = int(ref_model.config.vocab_size)
        prompts = [list(p) for p in prompts] if prompts is not None else parity_prompts(src, vocab)
        refs = []
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.int64)
            with torch.no_grad():
                ref_logits = ref_model(input_ids=ids).logits[0].float().numpy()
                ref = ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                         use_cache=True, pad_token_id=(eos or [0])[0], eos_token_id=eos)[0, len(p):].tolist()
            if eos:  # transformers pads a batch after EOS; batch 1 stops there, as genai does
                ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
            refs.append((ref_logits, ref))
    finally:
        ref_model.train(was_training)
    if loaded:
        del ref_model
        gc.collect()
    return refs, prompts


def export_causal_lm_genai(src: str | Path, out_dir: str | Path, *, precision: str = "fp32", n_new: int = 16,
                           parity_prompts_ids: Sequence[Sequence[int]] | None = None,
                           extra_options: Sequence[str] = (), calib_ids: Any = None,
                           group_size: int = GENAI_INT4_GROUP, reference_model: Any = None) -> dict[str, Any]:
    """Export the saved causal LM in ``src`` to an onnxruntime-genai folder ``out_dir``, atomically
    (a temporary sibling renamed into place; nothing is left behind on failure), with the parity
    check in ``out_dir/lm.json``. Returns that manifest plus ``path``. The builder always writes the
    weights to ``model.onnx.data`` beside ``model.onnx`` (any size, no 2 GB limit).
    ``reference_model``: the fp32 transformers model ``src`` holds, when the caller has it in memory
    (the parity check then does not load a second copy)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} for the onnxruntime-genai route")
    src, out_dir = Path(src), Path(out_dir)
    cfg = check_source(src)
    og = require_genai()
    try:
        import onnx_ir  # the builder imports it; say so before it fails half-way
        del onnx_ir
    except ImportError:
        raise UserError(f"onnxruntime-genai's builder needs the onnx-ir package: {INSTALL}") from None
    if out_dir.resolve() == src.resolve():
        raise UserError(f"--out {out_dir} is the model folder itself; choose another folder")
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        log, quantization = build_quantized(src, tmp, precision, extra_options=extra_options, calib_ids=calib_ids,
                                            group_size=group_size)
        build_s = time.perf_counter() - t0
        gc.collect()  # the builder's copies of the weights go before the parity check loads its own
        parity = genai_parity(tmp, src, precision, n_new=n_new, prompts=parity_prompts_ids,
                              reference_model=reference_model)
        gcfg = json.loads((tmp / GENAI_CONFIG).read_text())
        dec = gcfg.get("model", {}).get("decoder", {})
        meta = {"task": TASK, "layout": LAYOUT, "precision": precision, "execution_provider": "cpu",
                "source": str(src), "architecture": (cfg.get("architectures") or ["?"])[0],
                "model_type": cfg.get("model_type"), "num_layers": dec.get("num_hidden_layers"),
                "kv_heads": dec.get("num_key_value_heads"), "head_dim": dec.get("head_size"),
                "hidden_size": dec.get("hidden_size"), "vocab_size": gcfg.get("model", {}).get("vocab_size"),
                "context_length": gcfg.get("model", {}).get("context_length"),
                "eos_token_id": gcfg.get("model", {}).get("eos_token_id"),
                "tested_architecture": (cfg.get("architectures") or ["?"])[0] in TESTED_ARCHITECTURES,
                "builder": f"onnxruntime_genai.models.builder -p {precision} -e cpu", "builder_s": round(build_s, 2),
                "quantization": quantization,
                "builder_log_tail": log.strip().splitlines()[-5:], "parity_vs_pytorch": parity,
                "onnxruntime_genai": getattr(og, "__version__", None),
                "sglp_kept_layers": cfg.get("sglp_kept_layers"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        files = [f for f in tmp.iterdir() if f.is_file()]
        meta["size_bytes"] = sum(f.stat().st_size for f in files if f.name.startswith("model.onnx"))
        meta["sha256"] = sha256_file(tmp / "model.onnx")
        meta["external_data"] = (tmp / "model.onnx.data").is_file()
        meta["memory"] = {"process_peak_rss_bytes": peak_rss_bytes()}
        meta["files"] = sorted(f.name for f in files) + [META_FILE]
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    meta["path"] = str(out_dir)
    return meta


def export_model_genai(model: Any, tokenizer: Any, out_dir: str | Path, **kw: Any) -> dict[str, Any]:
    """Same from an in-memory transformers model (``sglp-edge export --genai``): saved with its
    tokenizer to a temporary folder next to ``out_dir`` first (the builder reads folders only)."""
    if tokenizer is None:
        raise UserError("the onnxruntime-genai route ships a tokenizer and this model has none; export a folder "
                        "that holds tokenizer files (save_hf(..., tokenizer=tok))")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.src.", dir=out_dir.parent))
    try:
        save_hf(model, tmp / "hf", tokenizer=tokenizer)
        import torch  # heavy: torch

        fp32 = all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
        if fp32 and "reference_model" not in kw:  # the parity reference: this model, not a reload of it
            kw["reference_model"] = model
        return export_causal_lm_genai(tmp / "hf", out_dir, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

