"""Distributed-training helpers of the training engine (:func:`sglp_edge.train.fit.fit`): joining the
``torchrun`` process group (gloo on CPU, nccl on CUDA), summing / maxing values across ranks, and
:class:`Replicated`, the whole model on every rank (DistributedDataParallel under ``torchrun``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else run alone.
    gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if world <= 1:
        dev = torch.device(device) if device else torch.device("cuda" if want_cuda else "cpu")
        return DistInfo(0, 1, 0, dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def all_reduce(values: list[float], info: DistInfo, op: str = "sum") -> list[float]:
    """``values`` summed (``op`` "sum") or maxed ("max") over the ranks; unchanged when running alone."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers on every rank (BatchNorm running stats drift apart between ranks after their
    last local forward); nothing when running alone."""
    if info.distributed:
        for b in model.buffers():
            dist.broadcast(b, 0)


class Replicated:
    """How the training engine holds the model when every rank keeps all of it: one process as is,
    under ``torchrun`` DistributedDataParallel. The state it saves and loads is the model's and the
    optimiser's own ``state_dict`` (the sharded counterpart is :class:`sglp_edge.train.fsdp.FullySharded`)."""

    collective_state = False  # gathering the state is local: only rank 0 builds it
    collective_forward = False  # a forward involves no other rank: evaluation may shard unevenly

    def __init__(self, info: DistInfo):
        self.info = info

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` on the run's device; the module to train (DDP-wrapped under torchrun)."""
        model.to(self.info.device)
        if not self.info.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None)

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()

    def model_copy(self, model: nn.Module) -> dict[str, Any]:
        """A CPU copy of the weights (the best-on-val ones, kept while training goes on)."""
        return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def optim_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return opt.state_dict()

    def load_optim_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The trained model as an ordinary module (it already is one)."""
        return model
