"""Fixed-resolution models at their own input size (issue 13, item 3): a ViT-B/16 (random weights)
pruned from Fashion-MNIST images resized to 224 px, where it used to die with an AssertionError."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")
REPO = Path(__file__).resolve().parent.parent


def test_vit_b_16_pruned_at_224_px(tmp_path):
    out = tmp_path / "vit"
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "prune", "torchvision:vit_b_16", "--data", "fashion-mnist",
                        "--keep", "8", "--method", "block_influence", "--calib-batches", "1", "--batch-size", "2",
                        "--allow-degenerate", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr
    # without weights its classifier head is zero: every output is the same, which is named (issue 28)
    assert "warning: the model's outputs do not depend on its input" in p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["calibration"]["input_shape"] == [3, 224, 224] and plan["calibration"]["resized_to"] == 224
    assert plan["n_units_before"] == 12 and plan["n_units_after"] == 8
    from sglp_edge.models.registry import load_model

    lm = load_model(str(out / "model"))
    assert len(lm.model.encoder.layers) == 8
    assert lm.model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_data_is_resized_to_the_models_input_size():
    from sglp_edge.data.datasets import get_dataset

    b = get_dataset("fashion-mnist", resize=224)
    x, y = b.calibration_batches(1, 2)[0]
    assert x.shape == (2, 3, 224, 224) and b.image_size == 224 and "resized" in b.describe()
    assert b.split("test")[0][0].shape == (3, 224, 224)  # evaluation images too
