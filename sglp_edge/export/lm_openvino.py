"""Decoder-LM export for OpenVINO: a stateful IR with fused attention, what optimum-intel makes.

The ONNX graph of :mod:`sglp_edge.export.lm` runs on OpenVINO, but OpenVINO's ONNX reader keeps its
attention as MatMul / Softmax and its KV cache as graph inputs and outputs, copied in and out on
every token. This route converts the PyTorch model with OpenVINO's own PyTorch frontend instead
(``torch.export`` -> ``ov.convert_model``), which keeps ``ScaledDotProductAttention`` as one op, then
makes the KV cache internal state (``apply_make_stateful_transformation``) with a ``beam_idx``
input in front of it, the layout optimum-intel and OpenVINO GenAI use. The CPU plugin then fuses
state, cache update and attention into one node.

Layout (``openvino_model.xml`` + ``.bin``):

    inputs   input_ids (batch, sequence) int64, attention_mask (batch, past + sequence) int64,
             position_ids (batch, sequence) int64, beam_idx (batch,) int32 (arange(batch) for greedy)
    outputs  logits (batch, sequence, vocab)
    state    one variable per past_key_values.{i}.key/value; ``reset_state()`` before a new sequence

Proof of the export (``lm.json``): on OpenVINO in f32 with an f32 KV cache, prefill of a prompt then
token-by-token decode reproduces PyTorch's full-sequence logits, and the greedy continuation is
identical to ``model.generate``.
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.board.atomic import atomic_dir, sha256_file
from benchmarks.board.errors import UserError
from benchmarks.board.lm_bench import LMSession

from sglp_edge.export.lm import (META_FILE, TASK, io_names, kv_shape, peak_rss_bytes, prefill_decode_parity,
                                 torch_reference)
from sglp_edge.models.hf_llm import unsupported_reason

OV_MODEL = "openvino_model.xml"
LAYOUT = "openvino-stateful"


def stateful_unsupported(model: nn.Module) -> str | None:
    """Why this decoder cannot take the stateful route (None: it can). Sliding-window layers keep
    a cache that is cut to the window, which this export does not model; they take the ONNX route."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        return f"{type(model).__name__} is not a transformers decoder"
    layers = DynamicCache(config=cfg).layers
    odd = sorted({type(x).__name__ for x in layers if type(x) is not DynamicLayer})
    if len(layers) < int(cfg.num_hidden_layers) or odd:
        return (f"{cfg.model_type} has cache layers of type {', '.join(odd) or 'unknown'} (sliding-window attention); "
                "the stateful OpenVINO export supports full-attention decoders only")
    return None


class _WithPastOV(nn.Module):
    """Flat tensors in and out, like export_lm's wrapper, but it fills the cache layers directly:
    ``DynamicLayer.update`` concatenates onto an empty 1-D tensor, which OpenVINO's Concat rejects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            layer = cache.layers[i]
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        res = [out.logits]
        for layer in out.past_key_values.layers[: self.n_layers]:
            res += [layer.keys, layer.values]
        return tuple(res)


def make_stateful(ov_model: Any, past: list[str], present: list[str]) -> None:
    """KV cache inputs/outputs -> internal state, behind a ``beam_idx`` Gather (optimum-intel's layout:
    the Gather is also what lets the CPU plugin fuse ReadValue, Concat and attention)."""
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    beam = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([-1]))
    beam.output(0).get_tensor().add_names({"beam_idx"})
    ov_model.add_parameters([beam])
    for name in past:
        port = ov_model.input(name)
        consumers = port.get_target_inputs()
        gathered = opset13.gather(port, beam, opset13.constant(0))
        for c in consumers:
            c.replace_source_output(gathered.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, dict(zip(past, present)))
    # each state starts as zeros of (batch, kv_heads, 0, head_dim), the batch taken from input_ids
    ids = ov_model.input("input_ids")
    batch = opset13.gather(opset13.shape_of(ids, output_type="i64"), opset13.constant([0]), opset13.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [opset13.constant(np.array([d.get_length() if d.is_static else 0], np.int64))
                    for d in op.get_output_partial_shape(0)]
            dims[0] = batch
            op.set_arguments([opset13.broadcast(opset13.constant(0.0, dtype=op.get_output_element_type(0)),
                                                opset13.concat(dims, 0))])
    ov_model.validate_nodes_and_infer_types()


def convert(model: nn.Module) -> Any:
    """The ``ov.Model`` (stateful, f32 weights) of a transformers ``XxxForCausalLM``."""
    import openvino as ov

    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    kvh, hd = kv_shape(cfg)
    w = _WithPastOV(model).eval()
    b, t, p = 2, 5, 3  # shapes that cannot specialise
    ex = (torch.randint(0, int(cfg.vocab_size), (b, t), generator=torch.Generator().manual_seed(0)),
          torch.ones(b, p + t, dtype=torch.int64), torch.arange(p, p + t).expand(b, t).contiguous(),
          tuple(torch.zeros(b, kvh, p, hd) for _ in range(2 * n_layers)))
    dyn_d = torch.export.Dim.DYNAMIC
    dyn = ({0: dyn_d, 1: dyn_d}, {0: dyn_d, 1: dyn_d}, {0: dyn_d, 1: dyn_d},
           tuple({0: dyn_d, 2: dyn_d} for _ in range(2 * n_layers)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.export.export(w, ex, dynamic_shapes=dyn, strict=False)
        ov_model = ov.convert_model(prog)
    del prog
    in_names, out_names = io_names(n_layers)
    if len(ov_model.inputs) != len(in_names) or len(ov_model.outputs) != len(out_names):
        raise UserError(f"OpenVINO converted {len(ov_model.inputs)} inputs / {len(ov_model.outputs)} outputs, "
                        f"expected {len(in_names)} / {len(out_names)}; use the ONNX route (sglp_edge.export.lm)")
    for port, name in zip(ov_model.inputs, in_names):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, out_names):
        port.get_tensor().set_names({name})
    ov_model.reshape({n: ov.PartialShape([-1, kvh, -1, hd]) for n in in_names[3:]})
    make_stateful(ov_model, in_names[3:], out_names[1:])
    return ov_model


def stateful_parity(artifact: Path, model: nn.Module, ids: torch.Tensor, *, split: int,
                    n_new: int = 4) -> dict[str, Any]:
    """Prefill ``ids[:, :split]`` then decode ``ids[:, split:]`` one token at a time on OpenVINO (f32,
    f32 KV cache, through the board's own LMSession), against PyTorch's full-sequence forward; plus
    ``n_new`` greedy tokens against ``model.generate``. PyTorch's reference is computed before
    OpenVINO compiles its own copy of the weights (the two never run side by side)."""
    ref = torch_reference(model, ids, n_new)
    sess = LMSession(str(artifact), "openvino", precision="fp32")
    try:
        return {"runtime": "openvino f32, f32 KV cache",
                **prefill_decode_parity(sess.step, sess.empty_past(ids.shape[0]), None, ids, split=split,
                                        n_new=n_new, reference=ref)}
    finally:
        del sess


def export_causal_lm_openvino(model: nn.Module, out_dir: str | Path, *,
                              parity_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Export a transformers ``XxxForCausalLM`` to ``out_dir/openvino_model.xml`` (+ ``.bin``, ``lm.json``),
    atomically. ``parity_ids`` (batch, T >= 3) int64: real token ids for the parity check."""
    import openvino as ov

    why = unsupported_reason(model) or stateful_unsupported(model)
    if why:
        raise UserError(f"cannot export for generation: {why}")
    t0 = time.perf_counter()
    cfg = model.config
    kvh, hd = kv_shape(cfg)
    was_training = model.training
    model.eval()
    out_dir = Path(out_dir)
    try:
        with atomic_dir(out_dir) as tmp:
            ov_model = convert(model)
            path = tmp / OV_MODEL
            ov.save_model(ov_model, str(path), compress_to_fp16=False)
            del ov_model
            gc.collect()  # the converted model's weights go before OpenVINO compiles the saved IR
            gen = torch.Generator().manual_seed(0)
            ids = parity_ids if parity_ids is not None else torch.randint(0, int(cfg.vocab_size), (2, 12), generator=gen)
            ids = ids.to(torch.int64)
            if ids.ndim != 2 or ids.shape[1] < 3:
                raise UserError("parity_ids must be (batch, tokens) with at least 3 tokens")
            parity = stateful_parity(path, model, ids, split=max(1, ids.shape[1] * 2 // 3))
            meta = {"task": TASK, "layout": LAYOUT, "num_layers": int(cfg.num_hidden_layers), "kv_heads": kvh,
                    "head_dim": hd, "vocab_size": int(cfg.vocab_size), "hidden_size": int(cfg.hidden_size),
                    "eos_token_id": getattr(cfg, "eos_token_id", None), "model_type": cfg.model_type,
                    "inputs": ["input_ids", "attention_mask", "position_ids", "beam_idx"], "outputs": ["logits"],
                    "state": "past_key_values.{i}.key/value (reset_state() before each new sequence)",
                    "converter": "torch.export -> openvino.convert_model (PyTorch frontend)",
                    "parity_vs_pytorch": parity, "torch": torch.__version__, "openvino": ov.__version__,
                    "sglp_kept_layers": getattr(cfg, "sglp_kept_layers", None),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            files = sorted(f for f in tmp.iterdir() if f.is_file() and f.name.startswith(path.stem))
            meta["files"] = [f.name for f in files] + [META_FILE]
            meta["size_bytes"] = sum(f.stat().st_size for f in files)
            meta["memory"] = {"weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                              "process_peak_rss_bytes": peak_rss_bytes()}
            meta["sha256"] = sha256_file(path.with_suffix(".bin"))
            meta["seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    finally:
        model.train(was_training)
    meta["path"] = str(out_dir / OV_MODEL)
    return meta
