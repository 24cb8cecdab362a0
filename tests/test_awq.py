"""AWQ scaling (sglp_edge/export/awq.py): same function in float, rounding error searched down, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.board.errors import UserError
from sglp_edge.export.awq import awq_scale, fake_quant


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # an outlier input channel, as real LMs have: what AWQ is for
        for layer in m.model.layers:
            layer.input_layernorm.weight[3] = 20.0
    return m


def _rounded_error(m: LlamaForCausalLM, ref: torch.Tensor, ids: torch.Tensor) -> float:
    q = _copy(m)
    with torch.no_grad():
        for layer in q.model.layers:
            for lin in [*layer.self_attn.children(), *layer.mlp.children()]:
                if isinstance(lin, nn.Linear):
                    lin.weight.copy_(fake_quant(lin.weight, 4, 32))
        return float((q(ids).logits - ref).pow(2).mean())


def _copy(m: LlamaForCausalLM) -> LlamaForCausalLM:
    c = LlamaForCausalLM(m.config).eval()
    c.load_state_dict(m.state_dict())
    return c


def test_awq_keeps_the_function_and_lowers_the_rounded_error():
    m = _tiny()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
    before = _rounded_error(m, ref, ids)
    rec = awq_scale(m, ids, bits=4, group_size=32)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert len(rec["alphas"]) == 2 and rec["calibration"] == {"blocks": 4, "tokens_per_block": 32}
    assert any(a > 0 for a in sum(rec["alphas"], []))  # the outlier channel makes scaling pay
    assert _rounded_error(m, ref, ids) < before


def test_awq_refusals():
    m = _tiny()
    with pytest.raises(UserError, match="does not divide"):
        awq_scale(m, torch.zeros(2, 8, dtype=torch.int64), group_size=48)
    with pytest.raises(UserError, match="blocks, tokens"):
        awq_scale(m, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(UserError, match="LLaMA-family"):
        awq_scale(nn.Linear(4, 4), torch.zeros(2, 8, dtype=torch.int64))
