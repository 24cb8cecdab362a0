"""A user's own pretrained model on the user's own images (issue 28): label-free scoring and KD
recovery when the image folder's classes are not the model's, --class-map to use labels, every
command taking ``file.py:fn --units``, degenerate (constant-output) models named, and attention
MACs counted in the path the model runs.

The "pretrained model of their own": the shipped Fashion-MNIST MobileNetV2 wrapped in the user's
file behind an RGB / ImageNet-normalised input (10 outputs); the photos: Fashion-MNIST test images
of four classes in four folders with unrelated names (so folder numbers 0-3 are not its classes)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Debian dataset-fashion-mnist is not installed")
REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"eta": 1, "iota": 5, "theta": 8, "zeta": 9}  # folder -> the model's class (trouser, sandal, bag, boot)

MY_NET = '''
"""My own pretrained classifier: RGB images normalised with ImageNet statistics in, 10 logits out."""
import torch
from torch import nn


class MyNet(nn.Module):
    image_size = 32  # the input size it was trained at

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1))

    def forward(self, x):
        grey = (x * self.std + self.mean).mean(1, keepdim=True)
        return self.net((grey - 0.2190) / 0.3318)


def build():
    from sglp_edge.models.registry import load_model

    return MyNet(load_model("mobilenetv2").model)  # with its trained weights
'''

ZERO_NET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class Net(nn.Module):
    image_size = 32

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(*[Block(8) for _ in range(4)])
        self.head = nn.Linear(8, 10)
        nn.init.zeros_(self.head.weight)  # a classifier head left at zero, as a ViT's default init leaves it
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net()
'''


def cli(*args, timeout=900):
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def one_line_error(p, code: int, needle: str) -> None:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]


def _fmnist_test():
    from sglp_edge.data.images import read_idx

    return (read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz"))


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """my_net.py, a folder of photos (80 per folder, from the first 6,000 test images), a class
    map, and held-out images (the rest of those four classes) normalised as the folder's are."""
    from PIL import Image

    from sglp_edge.data.images import IMAGENET_MEAN, IMAGENET_STD

    d = tmp_path_factory.mktemp("own")
    (d / "my_net.py").write_text(MY_NET)
    x, y = _fmnist_test()
    for name, c in FOLDERS.items():
        (d / "photos" / name).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(y[:6000] == c)[:80]):
            # 28 -> 37 pixels: the folder's eval transform (resize 37, center-crop 32) then gives the 32 x 32
            # zero-padded image the model was trained on
            Image.fromarray(np.pad(x[i], ((4, 5), (4, 5)))).save(d / "photos" / name / f"{k}.png")
    (d / "map.json").write_text(json.dumps(FOLDERS))
    idx = np.flatnonzero(np.isin(y[6000:], list(FOLDERS.values()))) + 6000
    held = torch.from_numpy(np.pad(x[idx], ((0, 0), (2, 2), (2, 2)))).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    held = (held - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return {"dir": d, "net": f"{d / 'my_net.py'}:build", "data": f"imagefolder:{d / 'photos'}", "held": held}


def _prune(own, out: Path, *extra):
    return cli("prune", own["net"], "--units", "net.blocks.*", "--keep", "10", "--data", own["data"],
               "--calib-batches", "2", "--batch-size", "64", "--out", out, *extra)


@pytest.fixture(scope="module")
def label_free(own):
    out = own["dir"] / "pruned-free"
    p = _prune(own, out)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, out


def _agreement(own, folder: Path) -> float:
    from sglp_edge.models.registry import load_model
    from sglp_edge.models.user_module import load_file_builder

    orig = load_file_builder(own["net"]).eval()
    pruned = load_model(folder).model.eval()
    with torch.no_grad():
        return float((pruned(own["held"]).argmax(1) == orig(own["held"]).argmax(1)).float().mean())


@needs_data
def test_label_free_scoring_keeps_at_least_the_labelled_agreement(own, label_free):
    p, out = label_free
    notices = [ln for ln in p.stderr.splitlines() if ln.startswith("label-free:")]
    assert len(notices) == 1 and "the data has 4 classes but the model has 10 outputs" in notices[0], p.stderr
    assert "label-free" in p.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["target"] == "teacher"  # not cross-entropy against folder numbers 0-3
    mapped = own["dir"] / "pruned-mapped"
    q = _prune(own, mapped, "--class-map", own["dir"] / "map.json")
    assert q.returncode == 0, q.stderr[-3000:]
    assert "label-free" not in q.stderr
    assert json.loads((mapped / "plan.json").read_text())["config"]["target"] == "labels"
    free, labelled = _agreement(own, out / "model"), _agreement(own, mapped / "model")
    assert free >= labelled, (free, labelled)


@needs_data
def test_finetune_distils_on_an_unlabelled_folder(own, label_free):
    _, pruned = label_free
    out = own["dir"] / "ft"
    # the teacher as prune took it; its units are read from the pruned checkpoint
    p = cli("finetune", pruned, "--teacher", own["net"], "--data", own["data"], "--steps", "12", "--batch-size", "64",
            "--no-progress", "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert any(ln.startswith("label-free:") for ln in p.stderr.splitlines()), p.stderr
    m = re.search(r"val agreement ([\d.]+)% -> ([\d.]+)%", p.stdout)
    assert m, p.stdout
    before, after = float(m.group(1)), float(m.group(2))
    assert after > before, p.stdout
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["config"]["target"] == "teacher" and summary["config"]["alpha"] == 1.0
    assert summary["val"]["agreement"] == pytest.approx(after / 100, abs=1e-4)


@needs_data
def test_finetune_refuses_label_weight_without_labels(own, label_free):
    _, pruned = label_free
    p = cli("finetune", pruned, "--teacher", own["net"], "--data", own["data"], "--steps", "1", "--alpha", "0.5",
            "--no-progress", "--out", own["dir"] / "ft-alpha")
    one_line_error(p, 2, "--class-map")
    assert not (own["dir"] / "ft-alpha").exists()


@needs_data
def test_export_and_teacher_take_file_py_with_units(own, label_free):
    _, pruned = label_free
    onnx = own["dir"] / "my_net.onnx"
    p = cli("export", own["net"], "--units", "net.blocks.*", "--out", onnx)
    assert p.returncode == 0, p.stderr[-3000:]
    assert onnx.is_file() and "passed=True" in p.stdout, p.stdout
    q = cli("finetune", pruned, "--teacher", own["net"], "--units", "net.blocks.*", "--data", own["data"],
            "--class-map", own["dir"] / "map.json", "--steps", "1", "--batch-size", "32", "--no-progress",
            "--out", own["dir"] / "ft-labels")
    assert q.returncode == 0, q.stderr[-3000:]
    assert "label-free" not in q.stderr and "val acc" in q.stdout, q.stdout


@needs_data
def test_class_map_must_cover_every_folder(own):
    from sglp_edge.data.datasets import get_dataset
    from benchmarks.board.errors import UserError

    partial = own["dir"] / "partial.json"
    partial.write_text(json.dumps({"eta": 1, "zeta": 9}))
    with pytest.raises(UserError, match="does not map the folder"):
        get_dataset(own["data"], class_map=partial, image_size=32)
    with pytest.raises(UserError, match="drop --class-map"):
        get_dataset("fashion-mnist", class_map=own["dir"] / "map.json")
    b = get_dataset(own["data"], class_map=own["dir"] / "map.json", image_size=32)
    assert b.num_classes == 10 and {int(b.train[i][1]) for i in range(len(b.train))} == set(FOLDERS.values())


@needs_data
def test_constant_output_model_is_refused_and_not_a_parity_pass(tmp_path):
    f = tmp_path / "zero.py"
    f.write_text(ZERO_NET)
    p = cli("prune", f"{f}:build", "--units", "body.*", "--keep", "2", "--calib-batches", "1", "--batch-size", "16",
            "--out", tmp_path / "o")
    one_line_error(p, 2, "the model's outputs do not depend on its input: are its weights loaded?")
    assert not (tmp_path / "o").exists()
    q = cli("prune", f"{f}:build", "--units", "body.*", "--keep", "2", "--calib-batches", "1", "--batch-size", "16",
            "--out", tmp_path / "o", "--allow-degenerate")
    assert q.returncode == 0, q.stderr[-2000:]  # insisting goes on, saying so
    assert "warning: the model's outputs do not depend on its input" in q.stderr, q.stderr[-2000:]
    assert any("candidate scores are equal" in n for n in json.loads((tmp_path / "o" / "plan.json").read_text())["notes"])
    r = cli("export", f"{f}:build", "--out", tmp_path / "zero.onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "passed=n/a (outputs constant)" in r.stdout and "passed=True" not in r.stdout, r.stdout


@needs_data
def test_a_folder_without_class_folders_has_no_labels(own, tmp_path):
    import shutil

    from sglp_edge.data.datasets import get_dataset
    from benchmarks.board.errors import UserError
    from sglp_edge.train.teacher_targets import choose_target

    flat = tmp_path / "flat"
    flat.mkdir()
    for png in sorted((own["dir"] / "photos" / "eta").glob("*.png"))[:30]:
        shutil.copy(png, flat / png.name)
    b = get_dataset(f"imagefolder:{flat}", image_size=32)
    assert b.num_classes == 0 and b.meta["labels"].startswith("none") and b.train[0][0].shape == (3, 32, 32)
    assert choose_target(10, b.num_classes) == ("teacher", "the data has no labels")
    with pytest.raises(UserError, match="without class folders"):
        get_dataset(f"imagefolder:{flat}", image_size=32, class_map=own["dir"] / "map.json")


def test_degenerate_checks_and_target_choice():
    from sglp_edge.train.teacher_targets import choose_target, is_constant, scores_all_equal

    assert is_constant(torch.zeros(4, 10)) and is_constant(torch.full((3, 5), 2.5))
    assert not is_constant(torch.randn(4, 10)) and not is_constant(torch.zeros(1, 10))
    assert scores_all_equal([6.907755, 6.907755, 6.907755]) and not scores_all_equal([1.0, 1.1])
    assert choose_target(1000, 77)[0] == "teacher" and choose_target(10, 10)[0] == "labels"
    assert choose_target(1000, 77, class_mapped=True)[0] == "labels"
    assert choose_target(1000, None)[0] == "teacher"
    assert choose_target(5, 10, named_classes=True)[0] == "labels"  # Fashion-MNIST on 5 outputs: the label check names --num-classes


def test_vit_b16_macs_match_the_formula():
    """ViT-B/16 at 224: patch embedding + 12 x (QKV and output projections, the two attention
    matmuls, the MLP) + head, counted in eval mode where nn.MultiheadAttention runs fused."""
    import torchvision

    from sglp_edge.models.registry import get_adapter
    from sglp_edge.sglp.prune import count_macs

    torch.manual_seed(0)
    m = torchvision.models.vit_b_16().eval()
    a = get_adapter(m)
    total, per_unit = count_macs(m, a, (torch.randn(1, 3, 224, 224),), a.units(m))
    T, D, M, L = 197, 768, 3072, 12
    block = 4 * T * D * D + 2 * T * T * D + 2 * T * D * M
    analytic = 3 * 16 * 16 * D * 196 + L * block + D * 1000
    assert abs(total - analytic) <= 0.02 * analytic, (total, analytic)
    blocks = [v for k, v in per_unit.items() if "encoder_layer" in k]
    assert blocks and all(abs(v - block) <= 0.02 * block for v in blocks), (blocks, block)
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while counting


def test_bert_layer_macs_match_the_formula():
    from transformers import BertConfig, BertModel

    from sglp_edge.models.registry import get_adapter
    from sglp_edge.sglp.prune import count_macs

    H, I, T = 64, 128, 16
    cfg = BertConfig(vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=I,
                     max_position_embeddings=64)
    m = BertModel(cfg, add_pooling_layer=False).eval()
    a = get_adapter(m)
    batch = {"input_ids": torch.randint(0, 100, (1, T)), "attention_mask": torch.ones(1, T, dtype=torch.long)}
    _, per_unit = count_macs(m, a, batch, a.units(m))
    layer = 4 * T * H * H + 2 * T * T * H + 2 * T * H * I
    assert per_unit and all(abs(v - layer) <= 0.02 * layer for v in per_unit.values()), (per_unit, layer)
