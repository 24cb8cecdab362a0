"""Bring your own model (issue 13, items 1-2): a small CNN defined in the user's own file, pruned
through ``--model file.py:fn --units``, saved without pickles, reloaded in a fresh process,
exported and compiled with ONNX Runtime; the same through the Python API; a ``torch.export``
program (.pt2); and the ``torchvision:resnet18 --units`` command of docs/bring-your-own-model.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")
REPO = Path(__file__).resolve().parent.parent

USER_NET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class TinyNet(nn.Module):
    """Not a torchvision model: a stem, six residual blocks, a linear head."""

    def __init__(self, num_classes=10, width=8, depth=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).flatten(1))


def build(num_classes=10):
    torch.manual_seed(0)
    return TinyNet(num_classes)
'''


def sh(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.fixture()
def user_file(tmp_path):
    f = tmp_path / "my_net.py"
    f.write_text(USER_NET)
    return f


def _fresh_logits(model_dir: Path, out: Path) -> torch.Tensor:
    code = ("import sys, torch; from sglp_edge.models.registry import load_model\n"
            "lm = load_model(sys.argv[1]); torch.manual_seed(1); x = torch.randn(4, 3, 32, 32)\n"
            "from safetensors.torch import save_file\n"
            "save_file({'y': lm.model(x).detach(), 'n': torch.tensor(len(lm.model.body))}, sys.argv[2])\n")
    p = sh("-c", code, model_dir, out)
    assert p.returncode == 0, p.stderr
    from safetensors.torch import load_file

    return load_file(str(out))


def test_user_file_cli_prune_reload_export_compile(tmp_path, user_file):
    out = tmp_path / "pruned"
    p = sh("-m", "sglp_edge.cli", "prune", f"{user_file}:build", "--units", "body.*", "--keep", "4",
           "--calib-batches", "1", "--batch-size", "16", "--out", out)
    assert p.returncode == 0, p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["family"] == "generic" and len(plan["removed"]) == 2 and plan["n_units_after"] == 4
    meta = json.loads((out / "model" / "sglp_model.json").read_text())
    assert meta["spec"]["base"] == {**meta["spec"]["base"], "kind": "file", "path": str(user_file), "fn": "build"}
    assert meta["removal_rounds"] == [plan["removed"]]
    assert not list((out / "model").glob("*.pt")) and not list((out / "model").glob("*.pkl"))  # no pickles

    # reloaded in a fresh process: 4 blocks left, the saved weights, the same outputs as here
    fresh = _fresh_logits(out / "model", tmp_path / "y.safetensors")
    from safetensors.torch import load_file

    from sglp_edge.models.registry import load_model

    here = load_model(str(out / "model"))
    assert int(fresh["n"]) == 4 and len(here.model.body) == 4
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in here.model.state_dict().items())
    torch.manual_seed(1)
    assert torch.allclose(here.model(torch.randn(4, 3, 32, 32)), fresh["y"], atol=1e-6)

    onnx = tmp_path / "pruned.onnx"
    p = sh("-m", "sglp_edge.cli", "export", out / "model", "--input-shape", "3x32x32", "--out", onnx)
    assert p.returncode == 0, p.stderr
    assert "passed=True" in p.stdout
    p = sh("-m", "sglp_edge.cli", "compile", onnx, "--backend", "onnxruntime", "--out", tmp_path / "ort")
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "ort" / "manifest.json").read_text())
    assert man["backend"]["name"] == "onnxruntime" and (tmp_path / "ort" / "model.onnx").is_file()


def test_user_file_through_the_python_api(tmp_path, user_file):
    import sglp_edge
    from sglp_edge.data.datasets import get_dataset

    model = sglp_edge.load_model(f"{user_file}:build")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = get_dataset("fashion-mnist").calibration_batches(2, 16)
    plan = sglp_edge.analyze(model, calib, units="body.*", keep=4)
    assert len(plan.removed) == 2 and all(u.startswith("body.") for u in plan.removed)
    pruned = sglp_edge.apply(model, plan)
    assert len(pruned.body) == 4 and len(model.body) == 6  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sglp_edge.save(pruned, tmp_path / "api")
    again = sglp_edge.load(tmp_path / "api")
    x = calib[0][0]
    assert len(again.body) == 4 and torch.allclose(again(x), pruned(x), atol=1e-6)
    fresh = _fresh_logits(tmp_path / "api", tmp_path / "y.safetensors")  # and in a new process
    torch.manual_seed(1)
    assert torch.allclose(again(torch.randn(4, 3, 32, 32)), fresh["y"], atol=1e-6)

    # a model built in the user's own code (not through load_model) needs the builder named
    spec_ = __import__("importlib.util").util.spec_from_file_location("my_net_direct", user_file)
    mod = __import__("importlib.util").util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    own = mod.build()
    pruned2 = sglp_edge.apply(own, sglp_edge.analyze(own, calib[:1], units="body.*", keep=5))
    with pytest.raises(sglp_edge.api.UserError, match="builder="):
        sglp_edge.save(pruned2, tmp_path / "own")
    sglp_edge.save(pruned2, tmp_path / "own", builder=f"{user_file}:build")
    assert len(sglp_edge.load(tmp_path / "own").body) == 5


def test_torch_export_program(tmp_path, user_file):
    import sglp_edge

    model = sglp_edge.load_model(f"{user_file}:build")
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    pt2 = tmp_path / "net.pt2"
    torch.export.save(ep, str(pt2))
    out = tmp_path / "pt2_pruned"
    p = sh("-m", "sglp_edge.cli", "prune", pt2, "--units", "body.*", "--keep", "4", "--calib-batches", "1",
           "--batch-size", "16", "--out", out)
    assert p.returncode == 0, p.stderr
    plan = json.loads((out / "plan.json").read_text())
    again = sglp_edge.load(out / "model")
    x = torch.randn(3, 3, 32, 32)
    # the removed blocks are gone (identity) and the kept ones carry the original weights
    ref = sglp_edge.load_model(f"{user_file}:build")
    for name in plan["removed"]:
        ref.body[int(name.split(".")[1])] = torch.nn.Identity()
    assert torch.allclose(again(x), ref(x), atol=1e-5)


def test_torchvision_resnet18_with_declared_units_saves_and_reloads(tmp_path):
    out = tmp_path / "r18"
    p = sh("-m", "sglp_edge.cli", "prune", "torchvision:resnet18", "--units", "layer1.*,layer2.*", "--keep", "3",
           "--calib-batches", "1", "--batch-size", "4", "--out", out)
    assert p.returncode == 0, p.stderr
    from sglp_edge.models.registry import load_model

    lm = load_model(str(out / "model"))
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["removed"]) == 1 and len(lm.model.layer1) + len(lm.model.layer2) == 3
    assert lm.model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_units_that_cannot_be_removed_fail_before_the_analysis(tmp_path, user_file):
    p = sh("-m", "sglp_edge.cli", "prune", f"{user_file}:build", "--units", "stem,head", "--keep", "1",
           "--calib-batches", "1", "--batch-size", "16", "--out", tmp_path / "o")
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "no declared unit can be removed" in lines[0], p.stderr
    p = sh("-m", "sglp_edge.cli", "prune", f"{user_file}:nosuch", "--units", "body.*", "--keep", "1",
           "--out", tmp_path / "o")
    assert p.returncode == 2 and "has no function 'nosuch'" in p.stderr and "build" in p.stderr
    assert not (tmp_path / "o").exists()
