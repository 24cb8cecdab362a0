"""Where the SGLP analysis runs: ``--accelerator auto|cpu|cuda``.

Calibration forwards, CKA capture and candidate scoring run on the chosen device; on CUDA a decoder
LM runs in bfloat16 where the GPU supports it (image models and encoders stay in float32). CKA is
accumulated in float64 on the host whatever the device (:mod:`sglp_edge.sglp.cka`). The analysis
only reads the model: the pruned model is cut from the original float32 weights on the host, so
the device copy's precision never reaches what is saved. The choice is recorded in ``plan.json``
(``accelerator``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.board.errors import UserError

ACCELERATORS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    requested: str
    device: torch.device
    dtype: torch.dtype
    why: str

    @property
    def on_host(self) -> bool:
        """Whether the analysis runs on the loaded model itself (host CPU, float32)."""
        return self.device.type == "cpu" and self.dtype == torch.float32

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "why": self.why}


def check_accelerator(requested: str) -> None:
    """Cheap check of the setting, before the model is loaded."""
    if requested not in ACCELERATORS:
        raise UserError(f"unknown --accelerator {requested!r}; choose one of {', '.join(ACCELERATORS)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use "
                        "--accelerator cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")


def choose_accelerator(requested: str, modality: str) -> Placement:
    """The device and dtype of the analysis: ``auto`` is CUDA when torch sees a GPU, else the CPU."""
    check_accelerator(requested)
    if requested == "cpu":
        return Placement(requested, torch.device("cpu"), torch.float32, "--accelerator cpu")
    if not torch.cuda.is_available():
        return Placement(requested, torch.device("cpu"), torch.float32, "auto: torch sees no CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev)
    if modality == "tokens" and torch.cuda.is_bf16_supported():
        return Placement(requested, dev, torch.bfloat16, f"{name}; a decoder LM in bfloat16 (CKA in float64 on the host)")
    return Placement(requested, dev, torch.float32, f"{name}; float32 ({'no bfloat16 on this GPU' if modality == 'tokens' else 'image and encoder models stay in float32'})")


def analysis_model(model: nn.Module, placement: Placement) -> nn.Module:
    """The model the analysis reads: ``model`` itself on the host, else a copy on the device in the
    placement's dtype, made parameter by parameter (no second full copy on the host). Buffers keep
    their dtype (rotary frequencies, BatchNorm statistics)."""
    if placement.on_host:
        return model
    memo: dict[int, Any] = {}
    for p in model.parameters():
        t = p.detach().to(placement.device, dtype=placement.dtype if p.is_floating_point() else None)
        memo[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(placement.device)
    return copy.deepcopy(model, memo)


def to_device(batch: Any, device: torch.device) -> Any:
    """A calibration batch (tensor, tuple/list or dict of them) on ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batches_on(batches: list[Any], placement: Placement) -> list[Any]:
    return batches if placement.device.type == "cpu" else [to_device(b, placement.device) for b in batches]

