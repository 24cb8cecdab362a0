"""Calibration data for a prune job: fixed batches drawn from the TRAINING split of the data, and
the cheap checks run on two samples before the heavy work (shape, labels, memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.board.errors import UserError
from sglp_edge.data import datasets
from sglp_edge.data.text import get_text_dataset
from sglp_edge.models.base import capture_unit_outputs
from sglp_edge.tasks.feature_extraction import get_sentence_dataset
from sglp_edge.train.teacher_targets import choose_target


def calibration_batches(loaded: Any, data: str, *, n_batches: int, batch_size: int, seq_len: int, seed: int,
                        data_root: Optional[Path] = None, offset: int = 0, info: Optional[dict] = None,
                        class_map: Optional[Path] = None) -> list[Any]:
    """Fixed calibration batches drawn from the training split of ``data`` (never the test split).
    Images: list of (x, y); token models: list of input_ids tensors of shape (batch, seq_len)."""
    if loaded.adapter.modality == "sentences":  # encoders: tokenised calibration sentences with a mask
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: a tokenizer is needed to draw sentence calibration data")
        if data.strip().lower() not in ("text", "english", "python-docs"):
            raise UserError(f"encoders calibrate on English sentences: use --data text (got {data!r})")
        bs = batch_size or 32
        sents = get_sentence_dataset(loaded.tokenizer, data_root, seed=seed, max_length=seq_len,
                                     max_sentences={"train": 1, "val": 1, "test": 1})
        return sents.calibration_batches(n_batches, bs, seed=seed + offset)
    if loaded.adapter.modality == "tokens":
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: a tokenizer is needed to draw text calibration data")
        need = n_batches * (batch_size or 8) * seq_len
        text = get_text_dataset(loaded.tokenizer, data_root, seed=seed, block_size=seq_len,
                                max_tokens=max(4 * need, 200_000))
        return text.calibration_batches(n_batches, batch_size or 8, seed=seed + offset)
    bundle = datasets.get_dataset(data, root=data_root, seed=seed, resize=fixed_input_size(loaded.model),
                           channels=input_channels(loaded.model), class_map=class_map)
    if info is not None:
        info.update(num_classes=bundle.num_classes, class_mapped="class_map" in bundle.meta,
                    named_classes=not bundle.name.startswith("imagefolder"))
    return bundle.calibration_batches(n_batches, batch_size or 128, seed=seed + offset)


def fixed_input_size(model: Any) -> Optional[int]:
    """The square input size a fixed-resolution model insists on (a torchvision ViT's
    ``image_size``; a user model may set ``model.image_size``), else None."""
    size = getattr(model, "image_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def input_channels(model: Any) -> int:
    """The image channels a model takes: 1 for a grey-scale model that says so
    (``model.in_channels == 1``, e.g. the shipped MobileNetV2), else 3 (grey data repeated)."""
    return 1 if getattr(model, "in_channels", None) == 1 else 3


def check_fit(loaded: Any, batch: Any, *, data: str, num_classes: Optional[int] = None,
              batch_size: Optional[int] = None, label_info: Optional[dict] = None) -> tuple[str, str]:
    """Cheap checks on two samples before the heavy work: the data's shape against the model,
    the labels against the model's outputs, and that declared units keep their input's shape.
    With ``label_info`` (``class_mapped``, ``named_classes``: see :func:`teacher_targets.choose_target`)
    data whose labels are not the model's classes is let through: returns ``(target, why)``,
    target "teacher" when the model's own outputs are to be the calibration target."""
    target, why = "labels", ""
    adapter, model = loaded.adapter, loaded.model
    small = _head(batch, 2)
    x = small[0] if isinstance(small, (tuple, list)) else small
    try:
        with torch.no_grad():
            out = adapter.forward(model, small)
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit the model
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{loaded.source} does not take --data {data} inputs of shape {list(x.shape[1:])} "
                        f"({type(e).__name__}: {msg}); use data of the model's input size") from None
    if adapter.modality == "image" and isinstance(out, torch.Tensor) and out.dim() == 2:
        n_out = int(out.shape[-1])
        if label_info is not None:
            target, why = choose_target(n_out, num_classes, class_mapped=bool(label_info.get("class_mapped")),
                                        named_classes=bool(label_info.get("named_classes")))
        labels = small[1] if isinstance(small, (tuple, list)) and len(small) > 1 else None
        if target == "teacher":
            pass
        elif (num_classes and num_classes > n_out) or (labels is not None and int(labels.max()) >= n_out):
            raise UserError(f"--data {data} has {num_classes or int(labels.max()) + 1} classes but the model has {n_out} "
                            f"outputs: labels >= {n_out} would score 0 % top-1; give a model with --num-classes "
                            f"{num_classes or int(labels.max()) + 1} or matching data")
    if hasattr(adapter, "check_shapes"):
        adapter.check_shapes(model, small)
    if batch_size:
        check_memory(loaded, small, batch_size)
    return target, why


def _mem_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(loaded: Any, small: Any, batch_size: int) -> None:
    """Whether one calibration batch fits in memory: the unit outputs CKA keeps, plus the
    activations a GradNorm backward pass holds (measured per sample on two samples, scaled)."""
    avail = _mem_available()
    if avail is None:
        return
    n = batch_len(small)
    units = loaded.adapter.units(loaded.model)
    outs = capture_unit_outputs(loaded.adapter, loaded.model, units, small)
    per_sample = sum(o.numel() * o.element_size() for o in outs) / max(1, n)
    need = per_sample * batch_size * 3  # kept outputs + forward/backward activations of a GradNorm pass
    if need > avail:
        fit = max(1, int(avail / (3 * per_sample)))
        raise UserError(f"a calibration batch of {batch_size} needs about {need / 2**30:.1f} GiB but "
                        f"{avail / 2**30:.1f} GiB is available; use --batch-size {fit} or less")


def _head(batch: Any, n: int) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(b[:n] for b in batch)
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    return batch[:n]


def batch_len(b: Any) -> int:
    if isinstance(b, (tuple, list)):
        return int(b[0].shape[0])
    if isinstance(b, dict):
        return int(b["input_ids"].shape[0])
    return int(b.shape[0])
