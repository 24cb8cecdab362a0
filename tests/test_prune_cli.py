"""`sglp-edge prune` end to end on real Fashion-MNIST calibration data: outputs, reload, and
one-line errors that leave nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglp_edge.models.registry import load_model

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")


def prune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sglp_edge.cli", "prune", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@needs_data
def test_prune_writes_model_plan_and_heatmap(tmp_path):
    out = tmp_path / "out"
    p = prune("cifar_resnet20", "--data", "fashion-mnist", "--keep", "6", "--calib-batches", "2", "--batch-size", "32",
              "--out", out)
    assert p.returncode == 0, p.stderr
    plan = json.loads((out / "plan.json").read_text())
    for key in ("units", "cka", "segments", "selections", "kept", "removed", "params_before", "params_after",
                "macs_before", "macs_after", "evaluations", "wall_s", "k"):
        assert key in plan, key
    assert len(plan["kept"]) == 6 and len(plan["removed"]) == 4
    assert plan["calibration"]["split"] == "train"
    n = len(plan["units"])
    cka = torch.tensor(plan["cka"])
    assert cka.shape == (n, n) and torch.allclose(cka.diagonal(), torch.ones(n, dtype=cka.dtype))
    segs = plan["segments"]
    assert segs[0][0] == 0 and segs[-1][1] == n and all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
    assert (out / "cka_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved model is genuinely smaller and reloads without sglp-edge private state beyond its spec
    lm = load_model(str(out / "model"))
    assert len(lm.adapter.units(lm.model)) == 6
    assert sum(p.numel() for p in lm.model.parameters()) == plan["params_after"]
    assert lm.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@needs_data
def test_baseline_method_and_macs_target(tmp_path):
    out = tmp_path / "bi"
    p = prune("cifar_resnet20", "--target-macs", "0.3", "--method", "block_influence", "--calib-batches", "1",
              "--batch-size", "32", "--out", out)
    assert p.returncode == 0, p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "block_influence" and plan["macs_reduction"] >= 0.3


@pytest.mark.parametrize("args,needle", [
    (["/nonexistent/model_dir/w.pt", "--keep", "3"], "does not exist"),
    (["resnet9000", "--keep", "3"], "unknown model"),
    (["cifar_resnet20", "--keep", "50"], "larger than the model's 10 prunable units"),
    (["cifar_resnet20", "--keep", "1"], "cannot be removed"),
    (["cifar_resnet20"], "--keep N"),
    (["cifar_resnet20", "--keep", "6", "--method", "magic"], "unknown method"),
    (["cifar_resnet20", "--keep", "many"], "number of units or 'auto'"),
    (["cifar_resnet20", "--latency-budget", "-1"], "--latency-budget must be a positive"),
    (["cifar_resnet20", "--keep", "6", "--latency-budget", "5"], "not both"),
    (["cifar_resnet20", "--keep", "auto", "--device", "local-cpu-ort-lm"], "no latency_p90_ms constraint"),
    (["cifar_resnet20", "--keep", "6", "--data", "cifar10", "--data-root", "/nonexistent"], "cifar"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    p = prune(*args, "--calib-batches", "1", "--batch-size", "16", "--out", out)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert needle.lower() in lines[0].lower()
    assert not out.exists() and not any(tmp_path.glob(".out.*"))


def test_corrupt_checkpoint_is_one_line(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "sglp_model.json").write_text(json.dumps({"format": "sglp-edge/vision-checkpoint/1", "family": "cifar_resnet",
                                                    "spec": {"depth": 20}, "removal_rounds": []}))
    (ck / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    p = prune(ck, "--keep", "6", "--out", tmp_path / "out")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "corrupt" in p.stderr
    assert not (tmp_path / "out").exists()
