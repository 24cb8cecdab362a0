"""How much memory a decoder LM needs to be pruned or fine-tuned, from its sizes read without loading
its weights (config.json or the GGUF header): the run YAML's check (:mod:`sglp_edge.tasks.causal_lm`)
and ``sglp-edge prune``'s (:meth:`sglp_edge.pipeline.prune_job.PruneJob.validate`) are one function."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from benchmarks.board.errors import UserError

GB = 1024**3


def meminfo_total() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=8)
def lm_dims(model: str) -> dict[str, Any] | None:
    """Sizes of a decoder LM read without loading its weights (config.json or the GGUF header, read
    once per process); None when they cannot be read cheaply (then the memory check is skipped)."""
    p = Path(model)
    try:
        if (p / "config.json").is_file():
            c = json.loads((p / "config.json").read_text())
            h, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
            return {"hidden": h, "layers": int(c["num_hidden_layers"]), "inter": int(c["intermediate_size"]),
                    "vocab": int(c["vocab_size"]), "heads": nh, "kv_heads": int(c.get("num_key_value_heads") or nh),
                    "tied": bool(c.get("tie_word_embeddings", False))}
        if model.lower() == "smollm2" or model.endswith(".gguf"):
            from gguf import GGUFReader

            from sglp_edge.models.hf_llm import smollm2_gguf  # heavy: hf_llm imports torch; this module stays light

            reader = GGUFReader(str(smollm2_gguf() if model.lower() == "smollm2" else p))
            f = reader.fields
            arch = bytes(f["general.architecture"].parts[f["general.architecture"].data[0]]).decode("utf-8")

            def num(key: str) -> int:
                fld = f[f"{arch}.{key}"]
                return int(fld.parts[fld.data[0]][0])

            tok = f["tokenizer.ggml.tokens"]
            return {"hidden": num("embedding_length"), "layers": num("block_count"), "inter": num("feed_forward_length"),
                    "vocab": len(tok.data), "heads": num("attention.head_count"),
                    "kv_heads": num("attention.head_count_kv"), "tied": "output.weight" not in
                    {t.name for t in reader.tensors}}
    except Exception:  # noqa: BLE001 - no cheap answer: skip the check rather than guess
        return None
    return None


def params_of(d: dict[str, Any]) -> int:
    h, hd = d["hidden"], d["hidden"] // d["heads"]
    per_layer = 2 * h * h + 2 * h * d["kv_heads"] * hd + 3 * h * d["inter"]
    return d["vocab"] * h * (1 if d["tied"] else 2) + d["layers"] * per_layer


def activation_bytes(d: dict[str, Any], batch: int, tokens: int) -> float:
    """fp32 bytes kept for one forward + backward over (batch, tokens): logits, log-softmax and its
    gradient; per layer the saved activations and the attention probabilities."""
    n = batch * tokens
    logits = 3.0 * n * d["vocab"] * 4
    layers = d["layers"] * (n * (10 * d["hidden"] + 4 * d["inter"]) * 4 + 2.0 * batch * d["heads"] * tokens**2 * 4)
    return logits + layers


def prune_memory_need(d: dict[str, Any], batch: int, tokens: int, *, forward_only: bool = False) -> float:
    """Bytes one calibration batch of ``batch`` sequences x ``tokens`` needs when pruning: the
    weights with their gradients and copies, plus the activations of a forward + backward pass.
    ``forward_only`` (the ``loss`` score): the weights once (the layers are removed in place), one
    forward's logits and one layer's activations, the unit outputs CKA and the prefix replay keep,
    and the CKA Grams."""
    if not forward_only:
        return 12.0 * params_of(d) + activation_bytes(d, batch, tokens)
    n = batch * tokens
    logits = 3.0 * n * d["vocab"] * 4
    layer = n * (10 * d["hidden"] + 4 * d["inter"]) * 4 + 2.0 * batch * d["heads"] * tokens**2 * 4
    kept = 2.0 * d["layers"] * n * d["hidden"] * 4
    grams = 2.0 * d["layers"] * min(n, 1024) ** 2 * 8
    return 4.0 * params_of(d) + logits + layer + kept + grams


#: above this many parameters the default calibration batch of an LM shrinks in proportion
LM_SCALE_PARAMS = 5e8
LM_DEFAULT_BATCH = 8


def lm_default_batch(params: float) -> tuple[int, str]:
    """The default calibration batch (sequences) of a decoder LM of ``params`` parameters, and why:
    8 sequences up to 0.5 B parameters, then 8 x 0.5 B / params (at least 2), so that a candidate
    evaluation costs about the same on every model size."""
    if params <= LM_SCALE_PARAMS:
        return LM_DEFAULT_BATCH, f"the default of {LM_DEFAULT_BATCH} sequences"
    b = max(2, int(round(LM_DEFAULT_BATCH * LM_SCALE_PARAMS / params)))
    return b, (f"{b} sequences: the default {LM_DEFAULT_BATCH} scaled by {LM_SCALE_PARAMS / 1e9:.1f} B / "
               f"{params / 1e9:.2f} B parameters (at least 2), so that a candidate evaluation costs about what it "
               "costs on a 0.5 B model; --batch-size N sets it")


def check_prune_memory(model: str, batch: int, tokens: int, *, flag: str = "prune.batch_size",
                       default: str = "prune.batch_size: 2 (the causal-lm default)", d: dict[str, Any] | None = None,
                       forward_only: bool = False) -> None:
    """Refuse, before the weights are loaded, a calibration batch that cannot fit in this machine's
    memory (the run YAML's check, and ``sglp-edge prune``'s; ``flag``/``default`` word the fix)."""
    d = d if d is not None else lm_dims(model)
    total = meminfo_total()
    if d is None or total is None:
        return
    need = prune_memory_need(d, batch, tokens, forward_only=forward_only)
    if need > 0.75 * total:
        raise UserError(f"{flag}={batch} sequences x {tokens} tokens needs about {need / GB:.0f} GB for {model} "
                        f"({params_of(d) / 1e6:.0f} M params) but this machine has {total / GB:.0f} GB; use "
                        f"{default} or shorter sequences")


def check_prune_job_memory(model: str, batch_size: int, seq_len: int, *, forward_only: bool = False) -> None:
    """``sglp-edge prune`` on a decoder LM (smollm2, a .gguf, an HF folder of a ...ForCausalLM):
    :func:`check_prune_memory` with the command's flags (batch 0 = its default of 8 sequences)."""
    cfg = Path(model) / "config.json"
    try:
        causal = model.lower() == "smollm2" or model.endswith(".gguf") or (
            cfg.is_file() and any("CausalLM" in a for a in json.loads(cfg.read_text()).get("architectures") or []))
    except (OSError, ValueError, AttributeError, TypeError):
        causal = False
    if causal:
        d = lm_dims(model)
        default = lm_default_batch(params_of(d))[0] if d is not None else LM_DEFAULT_BATCH
        check_prune_memory(model, batch_size or default, seq_len, flag="--batch-size", d=d, forward_only=forward_only,
                           default=f"--batch-size {default} (the default for LMs"
                                   f"{'' if default == LM_DEFAULT_BATCH else ' of this size'})")
