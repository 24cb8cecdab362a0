"""Baseline training: schedule, budgets, resume state, the `train` command, and the shipped
default model (its manifest and its accuracy on held-out Fashion-MNIST images)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.board.errors import UserError
from sglp_edge.models.cifar_resnet import cifar_resnet
from sglp_edge.models.registry import DEFAULT_MODEL, load_model
from sglp_edge.train.config import LoopConfig, lr_at
from sglp_edge.train.fit import fit, train_classifier
from sglp_edge.train.objectives import ClassificationObjective, evaluate

from test_finetune import quadrant_bundle

torch.set_num_threads(1)


def test_warmup_cosine_schedule():
    cfg = LoopConfig(steps=100, lr=0.2, warmup=0.1, warmup_start=0.1)
    assert lr_at(0.0, cfg) == pytest.approx(0.02)
    assert lr_at(0.1, cfg) == pytest.approx(0.2)
    assert lr_at(0.55, cfg) == pytest.approx(0.1)  # half way through the cosine
    assert lr_at(1.0, cfg) == pytest.approx(0.0, abs=1e-12)
    xs = [lr_at(p / 50, cfg) for p in range(5, 51)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))
    with pytest.raises(UserError, match="budget"):
        LoopConfig().check()
    with pytest.raises(UserError, match="--epochs"):
        LoopConfig(epochs=-1).check()


def test_train_classifier_learns_and_reports_held_out_accuracy():
    data = quadrant_bundle()
    torch.manual_seed(0)
    res = train_classifier(cifar_resnet(20, num_classes=4), data,
                           LoopConfig(epochs=4, batch_size=32, lr=0.05, warmup=0.1), progress=False)
    assert res.fit.steps == 4 * (320 // 32) and len(res.fit.history) == 4
    assert res.val_acc >= 0.9 and res.test_acc is not None and res.test_acc >= 0.85
    assert res.data["splits"] == {"train": 320, "val": 64, "test": 128}
    with pytest.raises(UserError, match="num-classes"):
        train_classifier(cifar_resnet(20, num_classes=10), data, LoopConfig(steps=1), progress=False)


def test_minutes_budget_and_epoch_checkpoint(tmp_path):
    data = quadrant_bundle()
    state = tmp_path / "s.pt"
    res = fit(cifar_resnet(20, num_classes=4), ClassificationObjective(), data.train, data.val, None,
              LoopConfig(minutes=0.01, batch_size=32, ckpt_minutes=0), state_path=state, progress=False)
    assert res.steps >= 1 and 0.6 <= res.train_seconds < 0.6 + 30
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == res.steps and saved["elapsed"] >= 0.6
    # resuming a finished run trains no further and gives the same weights
    m = cifar_resnet(20, num_classes=4)
    again = fit(m, ClassificationObjective(), data.train, data.val, None,
                LoopConfig(minutes=0.01, batch_size=32, ckpt_minutes=0), state_path=state, progress=False)
    assert again.steps == res.steps and again.resumed_from_step == res.steps


def test_train_command_writes_a_loadable_checkpoint_with_manifest(tmp_path):
    pytest.importorskip("mlxtend")
    from benchmarks.board.atomic import sha256_file
    from sglp_edge.cli import app

    out = tmp_path / "r20"
    r = CliRunner().invoke(app, ["train", "cifar_resnet20", "--data", "mnist5k", "--steps", "2", "--val-size", "64",
                                 "--out", str(out), "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["files"]["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    assert man["steps"] == 2 and man["dataset"]["splits"] == {"train": 3936, "val": 64, "test": 1000}
    assert man["reproduce"].startswith("sglp-edge train cifar_resnet20")
    assert 0 <= man["test_acc"] <= 1 and not (tmp_path / "r20.state.pt").exists()
    loaded = load_model(out)
    assert loaded.meta["manifest"]["steps"] == 2 and loaded.adapter.family == "cifar_resnet"

    bad = CliRunner().invoke(app, ["train", "cifar_resnet20", "--data", "mnist5k", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "budget" in bad.output and not (tmp_path / "x").exists()
    bad = CliRunner().invoke(app, ["train", "cifar_resnet20", "--data", "svhn", "--steps", "1", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "unknown data set" in bad.output and not (tmp_path / "y").exists()


def test_shipped_default_model_manifest_and_held_out_accuracy():
    from benchmarks.board.atomic import sha256_file
    from sglp_edge.data.datasets import get_dataset
    from sglp_edge.data.images import FASHION_MNIST_DIR

    man = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    assert man["files"]["model.safetensors"]["sha256"] == sha256_file(DEFAULT_MODEL / "model.safetensors")
    assert man["dataset"]["dataset"] == "fashion-mnist" and man["test_acc"] >= 0.92
    assert man["reproduce"].startswith("sglp-edge train cifar_resnet56 --data fashion-mnist")
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 8_000_000
    loaded = load_model("default")
    assert len(loaded.adapter.units(loaded.model)) == 28
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed")
    data = get_dataset("fashion-mnist", seed=man["seed"])
    sub = torch.utils.data.Subset(data.test, list(range(0, 10_000, 10)))  # 1,000 held-out images
    acc = evaluate(loaded.model, ClassificationObjective(), sub, batch_size=250)["acc"]
    # 1,000 images: standard error ~0.8 %, so stay within 3 points of the manifest's 10k figure
    assert acc >= man["test_acc"] - 0.03 and not math.isnan(acc)
