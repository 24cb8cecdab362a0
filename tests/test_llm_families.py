"""More decoder families (issue 13, item 5): Qwen3, Phi-3, Gemma 2 and Gemma 3 (per-layer
``layer_types`` with sliding windows), each as a tiny random model: layers removed, the result
equal to a model built directly with the kept layers (their own attention types), saved, reloaded
with plain ``AutoModelForCausalLM.from_pretrained``, and cached generation still right."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from sglp_edge.models.hf_llm import HFDecoderAdapter, save_hf  # noqa: E402

MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
FAMILIES = {
    "qwen3": dict(layer_types=MIXED, sliding_window=4, use_sliding_window=True, max_window_layers=4),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "gemma2": dict(layer_types=MIXED, sliding_window=4),
    "gemma3_text": dict(layer_types=MIXED, sliding_window=4),
}


def tiny(model_type, **kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, head_dim=8)
    cfg = AutoConfig.for_model(model_type, **{**base, **FAMILIES[model_type], **kw})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_prune_matches_a_model_built_with_the_kept_layers(tmp_path, model_type):
    model = tiny(model_type)
    ad = HFDecoderAdapter()
    assert ad.matches(model) and len(ad.units(model)) == 4
    pruned = ad.remove(model, ["model.layers.1", "model.layers.2"])  # keep layers 0 and 3
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    x = torch.randint(2, 64, (2, 12))  # longer than the sliding window (4)
    with torch.no_grad():
        y = pruned(x).logits
    kept_types = [MIXED[0], MIXED[3]] if "layer_types" in FAMILIES[model_type] else None
    assert getattr(pruned.config, "layer_types", None) == kept_types
    extra = {"layer_types": kept_types} if kept_types else {}
    if model_type == "qwen3":
        extra["max_window_layers"] = 2
    ref = tiny(model_type, num_hidden_layers=2, **extra)
    ref.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, y, atol=1e-5)
    if kept_types:  # the attention types matter here: wrong ones would give other logits
        wrong = tiny(model_type, num_hidden_layers=2, **{**extra, "layer_types": [kept_types[1], kept_types[0]]})
        wrong.load_state_dict(pruned.state_dict(), strict=True)
        with torch.no_grad():
            assert not torch.allclose(wrong(x).logits, y, atol=1e-4)

    save_hf(pruned, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    assert again.config.num_hidden_layers == 2 and again.config.sglp_kept_layers == [0, 3]
    with torch.no_grad():
        assert torch.allclose(again(x).logits, y, atol=1e-5)
    prompt = x[:1, :6]
    cached = again.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    plain = again.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_openvino_stateful_route_takes_full_attention_families_and_refuses_sliding_windows(tmp_path):
    """Phi-3 exports to the stateful OpenVINO IR and decodes like PyTorch; Gemma 2 (sliding-window
    layers) is refused up front with the reason, so `sglp-edge run` compiles its ONNX graph instead."""
    pytest.importorskip("openvino")
    from benchmarks.board.errors import UserError
    from sglp_edge.export.lm_openvino import export_causal_lm_openvino, stateful_unsupported

    phi = tiny("phi3")
    assert stateful_unsupported(phi) is None
    meta = export_causal_lm_openvino(phi, tmp_path / "phi3", parity_ids=torch.randint(2, 64, (2, 12)))
    assert meta["parity_vs_pytorch"]["passed"] and meta["parity_vs_pytorch"]["greedy_equal"]
    gemma = tiny("gemma2")
    assert "sliding-window" in stateful_unsupported(gemma)
    with pytest.raises(UserError, match="full-attention decoders only"):
        export_causal_lm_openvino(gemma, tmp_path / "gemma2")
    assert not (tmp_path / "gemma2").exists()
