"""Which adapter handles a model, how a model is named on the command line, and the project's
checkpoint format for vision models.

Vision checkpoint = a folder holding
  * ``model.safetensors`` - the (pruned) network's state dict, no pickled code;
  * ``sglp_model.json``   - ``{"format": ..., "spec": <adapter spec of the UNPRUNED architecture>,
    "removed_units": [...original unit names...], ...}``.
Reloading rebuilds the unpruned architecture from the spec, replays the removal, then loads the
weights, so no private state of this package is needed beyond the spec.
Hugging Face LMs are saved with ``save_pretrained`` instead (see ``hf_llm``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from benchmarks.board.atomic import atomic_dir
from benchmarks.board.errors import UserError
from sglp_edge.models.base import AdapterError, LoadedModel, ModelAdapter
from sglp_edge.models.cifar_resnet import CifarResNetAdapter, cifar_resnet
from sglp_edge.models.mobilenet_small import SmallMobileNetV2Adapter, mobilenetv2_fmnist
from sglp_edge.models import user_module
from sglp_edge.models.generic import GenericAdapter
from sglp_edge.models.hf_encoder import HFEncoderAdapter, is_encoder_source, load_hf_encoder, save_hf_encoder
from sglp_edge.models.hf_llm import HFDecoderAdapter, load_hf, save_hf
from sglp_edge.models.torchvision_adapters import ADAPTERS as TV
from sglp_edge.models.torchvision_adapters import build_torchvision

CHECKPOINT_FORMAT = "sglp-edge/vision-checkpoint/1"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "resnet56_fmnist"
MOBILENET_MODEL = ASSETS / "mobilenetv2_fmnist"
#: names of the shipped trained vision models -> their asset folder
SHIPPED = {"default": DEFAULT_MODEL, "resnet56": DEFAULT_MODEL, "resnet56-fmnist": DEFAULT_MODEL,
           "mobilenetv2": MOBILENET_MODEL, "mobilenetv2-fmnist": MOBILENET_MODEL}

SUPPORTED_FAMILIES = (
    "CIFAR ResNet-20/32/44/56/110 (cifar_resnet20..cifar_resnet110), "
    "a small MobileNetV2 for 28x28 grey images (mobilenetv2_fmnist), "
    "torchvision ResNet-18/34/50/101, VGG-11/13/16/19-BN, MobileNetV2, EfficientNet-B0..B7, ViT-B/L, "
    "Hugging Face decoders (Llama, SmolLM, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2/3; folder or .gguf), "
    "BERT-family sentence encoders (BERT/MiniLM, RoBERTa; folder or 'minilm')"
)


def _adapter_classes() -> list[type[ModelAdapter]]:
    return [CifarResNetAdapter, SmallMobileNetV2Adapter, *TV, HFDecoderAdapter, HFEncoderAdapter]


def get_adapter(model: nn.Module, units: str | Sequence[str] | None = None) -> ModelAdapter:
    """The adapter for ``model``; with ``units`` (glob patterns of module paths) a generic adapter
    over exactly those modules, for architectures this package does not know."""
    if units:
        return GenericAdapter(model, units)
    for cls in _adapter_classes():
        if cls.matches(model):
            return cls()
    raise AdapterError(
        f"unsupported architecture {type(model).__name__}; supported families: {SUPPORTED_FAMILIES}. "
        "For another architecture declare its layer units by module path, e.g. --units 'layer1.*,layer2.*'"
    )


def adapter_for_family(family: str) -> ModelAdapter:
    for cls in _adapter_classes():
        if cls.family == family:
            return cls()
    raise UserError(f"checkpoint names unknown model family {family!r}; supported: {SUPPORTED_FAMILIES}")


def save_checkpoint(
    model: nn.Module,
    adapter: ModelAdapter,
    folder: str | Path,
    *,
    spec: dict[str, Any] | None = None,
    removed_units: Sequence[str] | Sequence[Sequence[str]] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a vision checkpoint folder atomically. ``spec`` is the UNPRUNED architecture's spec
    (pass the original's when saving a pruned model). ``removed_units`` is one round of unit names
    (of the unpruned model) or a list of rounds, each naming units of the model left by the
    previous round (pruning a pruned model)."""
    from safetensors.torch import save_file

    if getattr(adapter, "modality", "image") == "tokens":
        return save_hf(model, folder, extra=extra)
    if getattr(adapter, "modality", "image") == "sentences":
        return save_hf_encoder(model, folder, extra=extra)
    spec = spec or model_spec(adapter, model)
    rounds = _as_rounds(removed_units)
    meta = {"format": CHECKPOINT_FORMAT, "family": adapter.family, "spec": spec,
            "removal_rounds": rounds, **(extra or {})}
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "sglp_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _as_rounds(removed: Any) -> list[list[str]]:
    removed = list(removed or [])
    if removed and all(isinstance(r, str) for r in removed):
        return [removed]
    return [list(r) for r in removed if r]


def load_checkpoint(folder: str | Path, *, trust_builder: bool = False) -> LoadedModel:
    """A vision checkpoint folder. A builder file it names (``file.py:fn`` / ``.pt2``) runs only when
    its sha256 matches the recorded one, or with ``trust_builder`` (``--trust-builder``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "sglp_model.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); re-save the checkpoint with sglp-edge") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path}: unknown checkpoint format {got!r} (expected {CHECKPOINT_FORMAT})")
    try:
        model, adapter = build_from_spec(meta["spec"], meta.get("family"), trust_builder=trust_builder)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or of the wrong type
        what = f"missing field {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{meta_path} is corrupt: its spec does not describe a model ({what}); re-save the checkpoint "
                        "with sglp-edge") from None
    rounds = _as_rounds(meta.get("removal_rounds", meta.get("removed_units", [])))
    for i, r in enumerate(rounds):
        if i and adapter.family == "generic":  # unit paths of a pruned model: glob again over it
            adapter = _generic(model, meta["spec"]["units"])
        model = adapter.remove(model, r, inplace=True)
    if rounds and adapter.family == "generic":
        adapter = _generic(model, meta["spec"]["units"])
    removed = [u for r in rounds for u in r]
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{folder / 'model.safetensors'} is unreadable or corrupt ({e}); re-create the checkpoint") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{folder}: weights do not match the architecture in sglp_model.json ({first})") from None
    model.eval()
    return LoadedModel(model, adapter, str(folder), "vision-checkpoint", meta, removed)


def _generic(model: nn.Module, units: Any) -> ModelAdapter:
    return GenericAdapter(model, units)


def model_spec(adapter: ModelAdapter, model: nn.Module) -> dict[str, Any]:
    """How to rebuild the UNPRUNED ``model`` (JSON, no code): the family's own spec, or for a model
    the user built (``file.py:fn``, ``.pt2``) or declared units for, the builder reference."""
    builder = getattr(model, "_sglp_builder", None)
    if adapter.family == "generic":
        pats = adapter.patterns  # type: ignore[attr-defined]
        units = pats if isinstance(pats, str) else ",".join(pats)
        if builder is None:
            try:
                base = get_adapter(model).spec(model)
            except UserError:
                raise UserError("this model cannot be saved: sglp-edge cannot rebuild it. Give it as "
                                "--model path/to/file.py:build_fn (or a .pt2 program) so it is rebuilt on load") from None
        else:
            base = builder
        return {"family": "generic", "units": units, "base": base}
    if builder is not None:
        return {"family": adapter.family, "builder": builder}
    return adapter.spec(model)


def build_from_spec(spec: dict[str, Any], family: str | None = None, *,
                    trust_builder: bool = False) -> tuple[nn.Module, ModelAdapter]:
    """The unpruned model and its adapter from :func:`model_spec`'s output (``trust_builder``: run a
    builder file whose sha256 no longer matches)."""
    fam = family or spec.get("family")
    if fam == "generic":
        base = spec["base"]
        model = (user_module.build_from_reference(base, trust=trust_builder) if "kind" in base
                 else adapter_for_family(base["family"]).build(base))
        return model, _generic(model, spec["units"])
    if "builder" in spec:
        return user_module.build_from_reference(spec["builder"], trust=trust_builder), adapter_for_family(fam)
    adapter = adapter_for_family(fam)
    return adapter.build(spec), adapter


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A user's .pt/.pth/.safetensors state dict, loaded without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt file
            raise UserError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load {path} as a weights-only checkpoint ({msg[:200]}); save a plain state_dict "
            "with torch.save(model.state_dict(), path) or use .safetensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state_dict (name -> tensor); save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _builtin(name: str) -> Callable[..., nn.Module] | None:
    n = name.lower().replace("-", "_")
    for d in (20, 32, 44, 56, 110):
        if n in (f"cifar_resnet{d}", f"resnet{d}_cifar"):
            return lambda num_classes=10, d=d: cifar_resnet(d, num_classes=num_classes)
    if n in ("mobilenetv2_fmnist", "mobilenetv2_small"):
        return lambda num_classes=10: mobilenetv2_fmnist(num_classes=num_classes)
    return None


def load_model(source: str | Path, *, weights: str | Path | None = None, num_classes: int | None = None,
               units: str | None = None, need_adapter: bool = True, trust_builder: bool = False,
               trust_remote_code: bool = False) -> LoadedModel:
    """Resolve a model named on the command line.

    * ``default`` / ``resnet56`` - the shipped ResNet-56 trained on Fashion-MNIST;
    * ``mobilenetv2`` - the shipped small MobileNetV2 trained on Fashion-MNIST (1 x 32 x 32 input);
    * a folder with ``sglp_model.json`` - a vision checkpoint written by sglp-edge;
    * a folder with ``config.json``, a ``.gguf`` file, or ``smollm2`` - a Hugging Face decoder LM;
    * ``minilm``, or a folder whose ``config.json`` says bert/roberta - a sentence encoder;
    * ``cifar_resnet20..110`` - a CIFAR ResNet (random init unless ``weights``);
    * ``mobilenetv2_fmnist`` - the small MobileNetV2 architecture (random init unless ``weights``);
    * ``torchvision:<name>`` (e.g. ``torchvision:resnet18``) - a torchvision architecture (random
      init unless ``weights`` points at a state dict on disk; nothing is downloaded).

    Nothing in a model file runs code unless asked: ``trust_builder`` runs a checkpoint's builder file
    whose sha256 no longer matches; ``trust_remote_code`` lets a Hugging Face folder's own Python
    (``auto_map``) run.
    """
    src = str(source)
    _check_load_options(src, weights, units)
    saved = _load_saved(src, trust_builder=trust_builder, trust_remote_code=trust_remote_code)
    if saved is not None:
        return saved
    model, kind = _build_architecture(src, num_classes)
    if weights is not None:
        _load_weights(model, weights, src)
    model.eval()
    try:
        adapter = get_adapter(model, units)
    except AdapterError:
        if need_adapter:
            raise
        return LoadedModel(model, None, src, kind, {})  # type: ignore[arg-type]  # units come later (API)
    return LoadedModel(model, adapter, src, kind, {"spec": _safe_spec(adapter, model)})


def _check_load_options(src: str, weights: str | Path | None, units: str | None) -> None:
    """``weights`` must be a file, and neither it nor ``units`` goes with a model that holds its own."""
    if weights is not None and not Path(weights).is_file():
        what = "is a folder, give a file" if Path(weights).is_dir() else "does not exist"
        raise UserError(f"weights file {weights} {what}")
    path = Path(src)
    trained = src in (*SHIPPED, "smollm2", "minilm") or path.suffix == ".gguf" or path.is_dir()
    if trained and (weights is not None or units):
        opt = "--weights" if weights is not None else "--units"
        raise UserError(f"{opt} applies to an architecture given by name (torchvision:<arch>, cifar_resnet20..110, "
                        f"file.py:build_fn, .pt2); {src} already holds its weights and layer units - drop {opt}")


def _load_saved(src: str, *, trust_builder: bool, trust_remote_code: bool) -> LoadedModel | None:
    """A model that holds its weights: a shipped one, a sentence encoder, a Hugging Face decoder or an
    sglp-edge checkpoint folder; None when ``src`` names an architecture (or nothing known)."""
    path = Path(src)
    if src in SHIPPED:
        folder = SHIPPED[src]
        if not (folder / "sglp_model.json").is_file():
            how = "python scripts/train_mobilenetv2.py" if folder == MOBILENET_MODEL else "`sglp-edge train`"
            raise UserError(f"the embedded model {src} is missing at {folder}; reinstall sglp-edge "
                            f"or train it with {how} (see README)")
        loaded = load_checkpoint(folder)
        loaded.kind = "builtin"
        return loaded
    if is_encoder_source(src):
        return load_hf_encoder(src, trust_remote_code=trust_remote_code)
    if src == "smollm2" or path.suffix == ".gguf" or (path.is_dir() and (path / "config.json").is_file()):
        return load_hf(src, trust_remote_code=trust_remote_code)
    if path.is_dir() and (path / "sglp_model.json").is_file():
        return load_checkpoint(path, trust_builder=trust_builder)
    if path.exists() and not (user_module.is_file_ref(src) or user_module.is_pt2(src)):
        raise UserError(f"{src} is neither an sglp-edge checkpoint folder (sglp_model.json), a Hugging Face "
                        "folder (config.json), a .gguf file, a .pt2 program nor file.py:build_fn")
    return None


def _build_architecture(src: str, num_classes: int | None) -> tuple[nn.Module, str]:
    """(the network, its kind) for an architecture named by ``src``: file.py:build_fn, a .pt2
    program, a built-in name or torchvision:<arch> (random init)."""
    ctor = _builtin(src)
    model: nn.Module | None = None
    kind = "torchvision" if src.startswith("torchvision:") else "builtin-arch"
    if user_module.is_file_ref(src):
        model, kind = user_module.load_file_builder(src, num_classes=num_classes), "user-file"
    elif user_module.is_pt2(src):
        model, kind = user_module.load_pt2(src), "pt2"
    elif ctor is not None:
        model = ctor(num_classes or 10)
    elif src.startswith("torchvision:"):
        model = build_torchvision(src.split(":", 1)[1], num_classes=num_classes)
    if model is None:
        if any(sep in src for sep in ("/", "\\")) or src.endswith((".pt", ".pth", ".safetensors")):
            raise UserError(f"model path {src} does not exist")
        raise UserError(f"unknown model {src!r}; give a checkpoint folder, a Hugging Face folder or .gguf, "
                        f"'default', 'mobilenetv2', 'smollm2', 'minilm', cifar_resnet20..110, mobilenetv2_fmnist or torchvision:<arch>. Supported families: {SUPPORTED_FAMILIES}")
    return model, kind


def _load_weights(model: nn.Module, weights: str | Path, src: str) -> None:
    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"weights {weights} do not fit {src} ({first}); check --num-classes and the architecture") from None


def _safe_spec(adapter: ModelAdapter, model: nn.Module) -> dict[str, Any] | None:
    try:
        return model_spec(adapter, model)
    except UserError:
        return None
