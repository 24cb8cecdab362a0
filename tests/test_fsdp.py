"""The fully sharded (FSDP2) KD fine-tune of a decoder LM: two gloo ranks on the CPU train step for
step as one process does on the same global batch, the model they save is an ordinary
``save_pretrained`` folder, and the state they write when killed resumes in one process.

Run by pytest; ``torchrun`` runs this same file as the two ranks (see ``ranks_main``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sglp_edge.models.hf_llm import HFDecoderAdapter, save_hf  # noqa: E402
from sglp_edge.train import kd  # noqa: E402
from sglp_edge.train.finetune import FinetuneConfig, finetune  # noqa: E402
from sglp_edge.train.fsdp import parallel_for  # noqa: E402
from sglp_edge.train.distributed import DistInfo, Replicated  # noqa: E402
from sglp_edge.train.interrupted import Interrupted  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402

STEPS, KILL_AT = 6, 4
# 12 training blocks, global batch 4: 3 steps an epoch, so 6 steps evaluate (and select) twice;
# 5 validation blocks split 3 / 2 over the ranks, so the sharded evaluation is uneven
CFG = dict(steps=STEPS, batch_size=4, lr=3e-3, optimizer="adamw", weight_decay=0.0, alpha=0.5, temperature=2.0,
           eval_batch_size=2, ckpt_minutes=0, progress=False)
ROOT = Path(__file__).resolve().parents[1]
KD_LOSS = kd.kd_loss


def pair() -> tuple[torch.nn.Module, torch.nn.Module, HFDecoderAdapter]:
    """A tiny random Llama teacher (tied embeddings, as SmolLM2) and its student without layer 1."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    ad = HFDecoderAdapter()
    return teacher, ad.remove(teacher, ["model.layers.1"]), ad


def data() -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 300, (12 + 5 + 4, 16), generator=g)
    return SimpleNamespace(modality="tokens", name="synthetic", train=blocks[:12], val=blocks[12:17], test=blocks[17:])


class LossLog:
    """Records each training step's KD loss (this rank's batch); ``kill_at``: SIGTERM to this process
    during that step, as a kill would (the run saves its state after the step and stops)."""

    def __init__(self, monkeypatch_setattr, kill_at: int | None = None):
        self.losses: list[float] = []

        def logged(*a, **k):
            loss = KD_LOSS(*a, **k)
            self.losses.append(float(loss.detach()))
            if kill_at is not None and len(self.losses) == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        monkeypatch_setattr(kd, "kd_loss", logged)


def _setattr(obj, name, value):
    setattr(obj, name, value)


def ranks_main(out: Path) -> None:
    """One torchrun rank: a full sharded run; a sharded run killed at step KILL_AT; that state resumed
    by the two sharded ranks."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    def mean_over_ranks(xs: list[float]) -> list[float]:
        t = torch.tensor(xs, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / dist.get_world_size()).tolist()

    teacher, student, ad = pair()
    log = LossLog(_setattr)
    res = finetune(student, teacher, ad, data(), FinetuneConfig(**CFG, shard="fsdp", state_path=str(out / "full.pt")))
    losses = mean_over_ranks(log.losses)  # equal local batches: the mean of the ranks' means is the global mean
    if dist.get_rank() == 0:
        save_hf(res.model, out / "model")
        (out / "full.json").write_text(json.dumps({"losses": losses, "val": res.val, "val_before": res.val_before,
                                                   "test": res.test, "selected": res.selected, "steps": res.steps,
                                                   "world": res.world_size, "plain": type(res.model).__name__}))
    teacher, student, ad = pair()
    log = LossLog(_setattr, kill_at=KILL_AT)
    try:
        finetune(student, teacher, ad, data(), FinetuneConfig(**CFG, shard="auto", state_path=str(out / "killed.pt")))
    except Interrupted as e:
        stopped = e.step
    killed = {"losses": mean_over_ranks(log.losses), "stopped": stopped, "auto_shards": isinstance(student, FSDPModule)}
    # the same state resumed by two sharded ranks (a copy: the test resumes the original in one process)
    if dist.get_rank() == 0:
        shutil.copy(out / "killed.pt", out / "killed-copy.pt")
    dist.barrier()
    teacher, student, ad = pair()
    log = LossLog(_setattr)
    res = finetune(student, teacher, ad, data(), FinetuneConfig(**CFG, state_path=str(out / "killed-copy.pt")))
    killed.update(resumed_losses=mean_over_ranks(log.losses), resumed_from=res.resumed_from_step, val=res.val)
    if dist.get_rank() == 0:
        (out / "killed.json").write_text(json.dumps(killed))
    dist.destroy_process_group()


def test_two_sharded_ranks_match_one_process_and_their_state_resumes_alone(tmp_path, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    # the two ranks first (they take the longest), in the background
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             __file__, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # one process, the same global batch
    teacher, student, ad = pair()
    log = LossLog(monkeypatch.setattr)
    ref = finetune(student, teacher, ad, data(), FinetuneConfig(**CFG, state_path=str(tmp_path / "ref.pt")))
    ref_losses = list(log.losses)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]

    full = json.loads((tmp_path / "full.json").read_text())
    assert full["world"] == 2 and full["steps"] == STEPS and full["plain"] == "LlamaForCausalLM"
    assert len(full["losses"]) == STEPS
    assert full["losses"] == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    assert full["losses"][-1] < full["losses"][0]  # it learns
    for split in ("val", "val_before", "test"):
        assert full[split]["nll"] == pytest.approx(getattr(ref, split)["nll"], rel=1e-4), split
    assert full["selected"] == ref.selected
    # the saved model is an ordinary save_pretrained folder holding the same weights as one process's
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert saved.config.num_hidden_layers == 3 and len(saved.model.layers) == 3
    want = ref.model.state_dict()
    for k, v in saved.state_dict().items():
        assert torch.allclose(v.float(), want[k].float(), atol=2e-4, rtol=1e-3), k

    # killed at step KILL_AT under two ranks, resumed by one process: the same steps follow
    killed = json.loads((tmp_path / "killed.json").read_text())
    assert killed["stopped"] == KILL_AT and killed["auto_shards"]  # --shard auto: FSDP for a decoder LM under torchrun
    assert killed["losses"] == pytest.approx(ref_losses[:KILL_AT], rel=1e-4, abs=1e-5)
    assert killed["resumed_from"] == KILL_AT
    assert killed["resumed_losses"] == pytest.approx(ref_losses[KILL_AT:], rel=1e-4, abs=1e-5)
    assert killed["val"]["nll"] == pytest.approx(ref.val["nll"], rel=1e-4)
    teacher, student, ad = pair()
    log = LossLog(monkeypatch.setattr)
    res = finetune(student, teacher, ad, data(), FinetuneConfig(**CFG, state_path=str(tmp_path / "killed.pt")))
    assert res.resumed_from_step == KILL_AT and res.steps == STEPS and res.world_size == 1
    assert log.losses == pytest.approx(ref_losses[KILL_AT:], rel=1e-4, abs=1e-5)
    assert res.val["nll"] == pytest.approx(ref.val["nll"], rel=1e-4)


def test_shard_choice():
    two = DistInfo(rank=0, world=2)
    assert isinstance(parallel_for("auto", "cifar_resnet", two), Replicated)  # images: DDP
    assert isinstance(parallel_for("ddp", "hf_decoder", two), Replicated)
    assert isinstance(parallel_for("fsdp", "hf_decoder", DistInfo()), Replicated)  # one process: nothing to shard
    with pytest.raises(UserError, match="decoder language models"):
        parallel_for("fsdp", "cifar_resnet", two)
    with pytest.raises(UserError, match="--shard"):
        FinetuneConfig(steps=1, shard="zero3").check()


def test_the_command_refuses_an_unknown_shard_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from sglp_edge.cli import app

    r = CliRunner().invoke(app, ["finetune", "mobilenetv2", "--teacher", "mobilenetv2", "--steps", "1",
                                 "--shard", "zero3", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "--shard must be auto, ddp or fsdp" in r.output
    assert not (tmp_path / "o").exists()


if __name__ == "__main__":
    ranks_main(Path(sys.argv[1]))
