"""Fully sharded KD fine-tune of decoder language models under ``torchrun`` (FSDP2,
``torch.distributed.fsdp.fully_shard``), for models whose student + gradients + optimiser state +
teacher do not fit one GPU.

* The student: each decoder layer (``model.layers.N``) is one FSDP unit, the rest (embeddings, final
  norm, LM head) the root unit; parameters, gradients and AdamW state are split across the ranks.
  Decoder layers recompute their activations in the backward pass (activation checkpointing,
  non-reentrant). On CUDA the forward and backward run in bfloat16 with float32 master weights and
  float32 gradient reduction (``MixedPrecisionPolicy``); on CPU (gloo) everything stays float32.
* The teacher: sharded the same way, frozen, in eval mode and resharded after every forward; on CUDA
  it is cast to bfloat16 first (it only runs forwards), so it costs ``2 B/param / world`` per rank.
  Sharding changes the teacher module in place.

The resume state is the same file as with one process or DDP: rank 0 writes full (unsharded) CPU
tensors, the model's ``state_dict`` and the optimiser's in ``torch.optim.Optimizer.state_dict``'s
own layout (parameters numbered in optimiser order), so a run resumes with any world size, with or
without ``torchrun``. At the end rank 0 gathers the weights into an ordinary (unsharded) model of the
student's class, which is saved with ``save_pretrained`` as usual.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, apply_activation_checkpointing,
                                                                         checkpoint_wrapper)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, Dataset

from benchmarks.board.errors import UserError
from sglp_edge.train.distributed import DistInfo, Replicated, all_reduce
from sglp_edge.train.objectives import Objective, to_device

SHARD_CHOICES = ("auto", "ddp", "fsdp")
DECODER_FAMILY = "hf_decoder"


def check_shard(shard: str) -> None:
    if shard not in SHARD_CHOICES:
        raise UserError(f"--shard must be one of {', '.join(SHARD_CHOICES)}, got {shard!r}")


def parallel_for(shard: str, family: str, info: DistInfo) -> Replicated | FullySharded:
    """How the fine-tune holds the model: ``auto`` shards decoder language models (adapter family
    ``hf_decoder``) under torchrun and replicates (DDP) everything else; ``ddp`` always replicates;
    ``fsdp`` shards (decoder LMs only). One process trains the whole model either way."""
    check_shard(shard)
    lm = family == DECODER_FAMILY
    if shard == "fsdp" and not lm:
        raise UserError(f"--shard fsdp shards decoder language models (Hugging Face XxxForCausalLM); this is a "
                        f"{family} model: use --shard ddp (or auto)")
    if info.distributed and lm and shard != "ddp":
        return FullySharded(info)
    return Replicated(info)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} has no model.layers: FSDP shards Hugging Face decoder LMs")
    return layers


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


class FullySharded:
    """The model split across the ranks (FSDP2); the same methods as :class:`Replicated`. Every
    method that touches the weights is a collective: all ranks call it."""

    collective_state = True  # every rank takes part in gathering the full state; rank 0 receives it
    collective_forward = True  # a forward all-gathers: every rank must run the same number of them

    def __init__(self, info: DistInfo):
        self.info = info
        self.mesh = init_device_mesh(info.device.type, (info.world,))
        gpu = info.device.type == "cuda"
        self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu else MixedPrecisionPolicy()
        self.cls: type | None = None
        self.attrs: dict[str, Any] = {}

    # -- sharding -------------------------------------------------------------------------------
    def shard_student(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing on each decoder layer, then each layer and the root sharded (the
        shards land on the run's device; the full model never does)."""
        if isinstance(model, FSDPModule):
            reshard(model)  # the optimiser must see the sharded parameters
            return model
        self.cls = type(model)
        self.attrs = {k: getattr(model, k) for k in ("generation_config", "name_or_path", "hf_quantizer")
                      if getattr(model, k, None) is not None}
        layers = set(decoder_layers(model))
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                            checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                                       check_fn=lambda m: m in layers)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, mp_policy=self.mp)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp)
        return model

    def shard_teacher(self, teacher: nn.Module) -> nn.Module:
        """Frozen, eval mode, bfloat16 on CUDA, each layer and the root sharded and resharded after
        every forward (no backward ever needs them)."""
        if isinstance(teacher, FSDPModule):
            return teacher.eval()
        teacher.requires_grad_(False)
        if self.info.device.type == "cuda":
            teacher.to(torch.bfloat16)
        for layer in decoder_layers(teacher):
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
        fully_shard(teacher, mesh=self.mesh, reshard_after_forward=True)
        return teacher.eval()

    def wrap(self, model: nn.Module) -> nn.Module:
        return self.shard_student(model)

    # -- state ----------------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """Full CPU weights on rank 0 (``{}`` on the others)."""
        return get_model_state_dict(model, options=_FULL)

    model_copy = model_state  # already a CPU copy

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rank 0's full ``state`` loaded into every rank's shards."""
        set_model_state_dict(model, state if self.info.is_main else {}, options=_FROM_RANK0)

    def optim_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """Full CPU optimiser state on rank 0 in ``Optimizer.state_dict``'s layout (``{}`` elsewhere)."""
        osd = get_optimizer_state_dict(model, opt, options=_FULL)
        if not self.info.is_main:
            return {}
        index = _param_index(osd["param_groups"])
        return {"state": {index[k]: v for k, v in osd["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]]}

    def load_optim_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """An ``Optimizer.state_dict``-layout state (from any world size) loaded into the shards."""
        osd: dict[str, Any] = {}
        if self.info.is_main:
            names = self._optim_names(model, opt)
            osd = {"state": {names[i]: v for i, v in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, opt, osd, options=_FROM_RANK0)

    @staticmethod
    def _optim_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
        """The name of each optimised parameter, in optimiser order, as the state-dict functions spell it."""
        names = {id(p): n for n, p in model.named_parameters()}
        clean = [names[id(p)].replace("_checkpoint_wrapped_module.", "") for g in opt.param_groups for p in g["params"]]
        return clean

    def plain_model(self, model: nn.Module) -> nn.Module:
        """Rank 0: an ordinary module of the student's class holding the gathered weights (saved with
        ``save_pretrained`` as usual). Other ranks: the sharded module."""
        state = self.model_state(model)
        if not self.info.is_main or self.cls is None:
            return model
        with torch.device("meta"):
            plain = self.cls(model.config)
        plain.load_state_dict(state, strict=False, assign=True)
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"FSDP: the gathered weights lack {missing[:3]}")
        sharded_buffers = {n.replace("_checkpoint_wrapped_module.", ""): b for n, b in model.named_buffers()}
        for name, buf in list(plain.named_buffers()):
            if buf.is_meta:  # non-persistent buffers (rotary frequencies) are not in the state dict
                mod, _, leaf = name.rpartition(".")
                plain.get_submodule(mod)._buffers[leaf] = sharded_buffers[name].detach().cpu().clone()
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
            plain.tie_weights()
        for k, v in self.attrs.items():
            setattr(plain, k, v)
        return plain.eval()


def reshard(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` back to its shards: the root keeps its weights gathered after a
    forward (for the backward it expects), and a forward without backward (evaluation) leaves them so."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _param_index(groups: list[dict[str, Any]]) -> dict[str, int]:
    """Parameter name -> its number in ``Optimizer.state_dict``'s layout (optimiser order across groups)."""
    names = [n for g in groups for n in g["params"]]
    return {n: i for i, n in enumerate(names)}


@torch.no_grad()
def evaluate_sharded(model: nn.Module, task: Objective, dataset: Dataset, *, batch_size: int = 256,
                     info: DistInfo | None = None) -> dict[str, float]:
    """:func:`sglp_edge.train.objectives.evaluate` for a sharded model: the same strided shard per
    rank, but every rank runs the same number of forwards (a rank whose shard is shorter repeats its
    first item and discards the result), since each forward all-gathers the weights."""
    info = info or DistInfo()
    was = model.training
    model.eval()
    idx = list(range(info.rank, len(dataset), info.world))
    n_batches = -(-len(idx) // batch_size)
    n_max = int(all_reduce([float(n_batches)], info, "max")[0])
    sums: dict[str, float] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, sampler=idx, num_workers=0):
        for k, v in task.eval_sums(model, to_device(batch, info.device)).items():
            sums[k] = sums.get(k, 0.0) + v
    filler = next(iter(DataLoader(dataset, batch_size=1)))
    for _ in range(n_max - n_batches):  # keep the collectives in step; these sums are not counted
        keys = task.eval_sums(model, to_device(filler, info.device))
        sums.update({k: sums.get(k, 0.0) for k in keys})
    keys = sorted(sums)
    sums = dict(zip(keys, all_reduce([sums[k] for k in keys], info)))
    reshard(model)
    model.train(was)
    return task.finalize(sums)
