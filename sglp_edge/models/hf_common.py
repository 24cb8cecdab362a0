"""Helpers shared by the Hugging Face adapters (the decoder LMs of :mod:`.hf_llm` and the encoders
of :mod:`.hf_encoder`): structure checks, the per-layer bookkeeping after a layer removal (config
lists + ``layer_idx``, undoable for temporary removals), token batches, the atomic
``save_pretrained`` folder with ``sglp_prune.json``, and the offline-loading helpers.

transformers is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from benchmarks.board.atomic import atomic_dir
from benchmarks.board.errors import UserError
from sglp_edge.models.base import AdapterError

PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
PRUNE_META_FILE = "sglp_prune.json"
PRUNE_META_FORMAT = "sglp-edge/hf-prune/1"


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
# saving
# ---------------------------------------------------------------------------------------------
def prune_metadata(model: nn.Module, family: str) -> dict[str, Any]:
    """``sglp_prune.json``'s layer bookkeeping for a pruned (or unpruned) HF model of ``family``."""
    cfg = model.config
    n = int(cfg.num_hidden_layers)
    kept = getattr(cfg, "sglp_kept_layers", None) or list(range(n))
    orig = getattr(cfg, "sglp_original_num_hidden_layers", None) or n
    return {
        "format": PRUNE_META_FORMAT,
        "family": family,
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "num_hidden_layers": n,
        "original_num_hidden_layers": int(orig),
        "kept_layers": [int(i) for i in kept],
        "removed_layers": [i for i in range(int(orig)) if i not in set(kept)],
        "params": int(sum(p.numel() for p in model.parameters())),
    }


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


def _load_tokenizer(folder: Path, *, trust_remote_code: bool = False, **kw: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code, **kw)


# ---------------------------------------------------------------------------------------------
# a folder's own Python code (auto_map): never run unless the user asks (--trust-remote-code)
# ---------------------------------------------------------------------------------------------
REMOTE_CODE_FIX = "pass --trust-remote-code to run it if you trust where the folder came from"


def check_remote_code(folder: Path, trust: bool) -> None:
    """Refuse (one line, before transformers is asked) a folder whose config.json maps its classes to
    the folder's own Python files (``auto_map``) for a model type transformers does not ship. Every
    load passes ``trust_remote_code`` explicitly, so transformers never prompts; a folder with
    ``auto_map`` for a type it ships loads with the built-in classes (a note says so)."""
    if trust:
        return
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # the loader reports an unreadable config.json
    if not (isinstance(cfg, dict) and cfg.get("auto_map")):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UserError(f"{folder} ships its own Python code (auto_map in config.json, model_type {model_type!r}), "
                        f"which sglp-edge does not run; {REMOTE_CODE_FIX}")
    print(f"note: {folder / 'config.json'} names custom code (auto_map); loading transformers' built-in "
          f"{model_type} classes, not that code (--trust-remote-code runs it)", file=sys.stderr)


def remote_code_error(e: BaseException, folder: Path) -> UserError | None:
    """transformers' refusal to load custom code (asked with trust_remote_code=False), as one line."""
    if "trust_remote_code" not in str(e):
        return None
    return UserError(f"{folder} needs its own Python code to load (auto_map in its config or tokenizer files), "
                     f"which sglp-edge does not run; {REMOTE_CODE_FIX}")
