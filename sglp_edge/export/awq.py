"""Activation-aware weight scaling (AWQ) of a decoder LM before 4-bit weights, calibrated on the run's text.

A 4-bit weight's rounding error matters in proportion to the activation it multiplies. AWQ (Lin et
al., 2023) scales each input channel ``j`` of a linear layer by ``s_j = mean|x_j| ** alpha`` and the
op that feeds it by ``1 / s_j``: the network computes the same function in float, but the channels
that carry large activations get finer steps once the weights are rounded. ``alpha`` is searched per
group of layers (0 .. 1), minimising the error of the group's output with the weights rounded as the
runtime will round them (symmetric, ``group_size`` per block along the input).

Groups scaled in each decoder layer (LLaMA family: Llama, SmolLM, Qwen2, Mistral):

    input_layernorm           -> q_proj, k_proj, v_proj   (the norm's weight takes 1 / s)
    post_attention_layernorm  -> gate_proj, up_proj       (the same)
    up_proj (its output rows) -> down_proj                (SiLU(gate) * up is linear in up)

The result is an ordinary model of the same class, same function in fp32 (to float rounding), whose
low-bit export (any route: the onnxruntime-genai builder, ``MatMulNBits``, NNCF, llama.cpp's
quantizer) loses less. The LM head is left alone (it is tied to the embedding in small models and
is kept at 8 bits by the low-bit routes).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.board.errors import UserError

ALPHAS = tuple(i / 10 for i in range(11))
#: calibration tokens the alpha search evaluates the rounded output on (the channel means use them all)
SEARCH_TOKENS = 512


def fake_quant(w: torch.Tensor, bits: int = 4, group_size: int = 32) -> torch.Tensor:
    """Round ``w`` (out, in) to ``bits``-bit symmetric levels per block of ``group_size`` inputs."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise UserError(f"AWQ: group size {group_size} does not divide the input size {in_f}")
    g = w.reshape(out_f, in_f // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    return (torch.clamp(torch.round(g / scale), -qmax - 1, qmax) * scale).reshape(out_f, in_f)


def _search(x: torch.Tensor, linears: list[nn.Linear], bits: int, group_size: int) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale (and its alpha) that minimises the rounded group's output error on ``x``."""
    act = x.abs().reshape(-1, x.shape[-1]).mean(0).clamp_min(1e-6)
    if len(x) > SEARCH_TOKENS:  # an even spread of the calibration tokens
        x = x[torch.linspace(0, len(x) - 1, SEARCH_TOKENS).long()]
    ref = [x @ m.weight.T for m in linears]
    best = (torch.ones_like(act), 0.0, float("inf"))
    base = None
    for alpha in ALPHAS:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for m, r in zip(linears, ref):
            wq = fake_quant(m.weight * s, bits, group_size) / s
            err += float((x @ wq.T - r).pow(2).mean())
        if alpha == 0.0:
            base = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], (best[2] / base if base else 1.0)


def _layer_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per decoder layer, the inputs of q/k/v, of gate/up and of down_proj, on the calibration blocks."""
    caps: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, inp: tuple) -> None:
            caps.setdefault(name, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        return fn

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(hook(f"{i}.attn")))
        hooks.append(layer.mlp.gate_proj.register_forward_pre_hook(hook(f"{i}.mlp")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook(f"{i}.down")))
    try:
        with torch.no_grad():
            for blk in ids:
                model(input_ids=blk[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in caps.items()}


def check_model(model: nn.Module) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise UserError(f"AWQ scaling needs a LLaMA-family decoder (model.layers); got {type(model).__name__}")
    for part in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
        if not hasattr(layers[0], part):
            raise UserError(f"AWQ scaling: {type(layers[0]).__name__} has no {part}; it supports LLaMA-family decoders")
    if "Gemma" in type(layers[0].input_layernorm).__name__:  # its norm multiplies by (1 + weight)
        raise UserError("AWQ scaling: Gemma's RMSNorm scales by 1 + weight; scaling is not supported for it")
    for p in ("q_proj", "k_proj", "v_proj"):
        if getattr(layers[0].self_attn, p, None) is None:
            raise UserError(f"AWQ scaling: the attention has no separate {p}")


def awq_scale(model: nn.Module, calib_ids: Any, *, bits: int = 4, group_size: int = 32,
              log: Any = None) -> dict[str, Any]:
    """Scale ``model`` in place (see the module docstring); returns the record kept with the artifact."""
    check_model(model)
    ids = torch.as_tensor(np.asarray(calib_ids), dtype=torch.int64)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise UserError(f"AWQ calibration blocks must be (blocks, tokens); got {tuple(ids.shape)}")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    caps = _layer_inputs(model, ids)
    alphas, gains = [], []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            at, mlp = layer.self_attn, layer.mlp
            s, a, g = _search(caps[f"{i}.attn"], [at.q_proj, at.k_proj, at.v_proj], bits, group_size)
            for m in (at.q_proj, at.k_proj, at.v_proj):
                m.weight.mul_(s)
            layer.input_layernorm.weight.div_(s)
            s2, a2, g2 = _search(caps[f"{i}.mlp"], [mlp.gate_proj, mlp.up_proj], bits, group_size)
            for m in (mlp.gate_proj, mlp.up_proj):
                m.weight.mul_(s2)
            layer.post_attention_layernorm.weight.div_(s2)
            s3, a3, g3 = _search(caps[f"{i}.down"], [mlp.down_proj], bits, group_size)
            mlp.down_proj.weight.mul_(s3)
            mlp.up_proj.weight.div_(s3[:, None])
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias.div_(s3)
            alphas.append([a, a2, a3])
            gains.append([g, g2, g3])
            if log:
                log(f"AWQ layer {i + 1}/{len(model.model.layers)}: alpha {a:.2f} / {a2:.2f} / {a3:.2f}, rounded-output "
                    f"error x{g:.2f} / {g2:.2f} / {g3:.2f} of plain rounding")
    model.train(was_training)
    return {"method": "AWQ scales (activation-aware, searched per layer group)", "bits": bits,
            "group_size": group_size, "calibration": {"blocks": int(ids.shape[0]), "tokens_per_block": int(ids.shape[1])},
            "alphas": alphas, "error_vs_plain_rounding": float(np.mean(gains)), "seconds": round(time.perf_counter() - t0, 1)}
