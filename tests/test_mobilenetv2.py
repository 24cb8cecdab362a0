"""The small MobileNetV2 (sglp_edge/models/mobilenet_small.py): units, real removal, checkpoint
reload, the shipped asset, ONNX export checked with ONNX Runtime, and a prune job on it."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from benchmarks.board.errors import UserError
from sglp_edge.models.mobilenet_small import SmallMobileNetV2, SmallMobileNetV2Adapter, mobilenetv2_fmnist
from sglp_edge.models.registry import MOBILENET_MODEL, get_adapter, load_checkpoint, load_model, save_checkpoint


def _net(seed: int = 0) -> SmallMobileNetV2:
    torch.manual_seed(seed)
    m = mobilenetv2_fmnist().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a removed block changes the function
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return m


def test_units_follow_the_identity_shortcuts():
    m = _net()
    a = get_adapter(m)
    assert isinstance(a, SmallMobileNetV2Adapter)
    units = a.units(m)
    assert [u.name for u in units] == ["stem"] + [f"blocks.{i}" for i in range(12)]
    fixed = [u.name for u in units if not u.removable]
    assert fixed == ["stem", "blocks.2", "blocks.5", "blocks.9"]  # stem + stride/channel-changing blocks
    for u in units[1:]:
        assert u.removable == m.blocks[int(u.name.split(".")[1])].use_res_connect
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # fully convolutional: the unpadded size works too


def test_removal_is_real_and_the_checkpoint_reloads(tmp_path):
    m = _net()
    a = get_adapter(m)
    x = torch.randn(4, 1, 32, 32)
    pruned = a.remove(m, ["blocks.1", "blocks.7", "blocks.11"])
    assert len(pruned.blocks) == 9 and len(m.blocks) == 12  # the original is untouched
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in m.parameters())
    assert not torch.allclose(pruned(x), m(x))
    assert len(a.units(pruned)) == 10
    with pytest.raises(UserError, match="cannot be removed"):
        a.remove(m, ["blocks.5"])
    save_checkpoint(pruned, a, tmp_path / "ck", spec=a.spec(m), removed_units=["blocks.1", "blocks.7", "blocks.11"])
    back = load_checkpoint(tmp_path / "ck")
    assert back.removed_units == ["blocks.1", "blocks.7", "blocks.11"]
    assert len(back.model.blocks) == 9
    torch.testing.assert_close(back.model(x), pruned(x))


def test_shipped_asset_loads_and_records_its_training():
    loaded = load_model("mobilenetv2")
    assert isinstance(loaded.model, SmallMobileNetV2) and loaded.model.in_channels == 1
    man = json.loads((MOBILENET_MODEL / "manifest.json").read_text())
    assert man["model"] == "mobilenetv2_fmnist" and man["dataset"]["dataset"] == "fashion-mnist"
    assert man["test_acc"] >= 0.90  # the recorded held-out accuracy of the shipped weights
    size = (MOBILENET_MODEL / "model.safetensors").stat().st_size
    assert size == man["files"]["model.safetensors"]["bytes"] < 5_000_000
    from benchmarks.board.atomic import sha256_file

    assert sha256_file(MOBILENET_MODEL / "model.safetensors") == man["files"]["model.safetensors"]["sha256"]
    with pytest.raises(UserError, match="already holds its weights"):
        load_model("mobilenetv2", units="blocks.*")


def test_architecture_by_name_is_untrained():
    loaded = load_model("mobilenetv2_fmnist")
    assert loaded.kind == "builtin-arch" and isinstance(loaded.model, SmallMobileNetV2)
    assert loaded.meta["spec"]["family"] == "mobilenetv2_small"


def test_pruned_net_exports_to_onnx_with_runtime_parity(tmp_path):
    from sglp_edge.export.onnx_export import export_onnx

    m = _net(1)
    pruned = get_adapter(m).remove(m, ["blocks.0", "blocks.4", "blocks.10"])
    x = torch.randn(16, 1, 32, 32)
    r = export_onnx(pruned, x[:1], tmp_path / "m.onnx", parity_inputs=x, progress=False)
    assert r.parity["passed"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[:5].numpy()})[0]  # dynamic batch
    with torch.no_grad():
        want = pruned(x[:5]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_prune_job_on_the_shipped_model(tmp_path):
    from sglp_edge.pipeline.prune_job import PruneJob, run_prune_job

    res = run_prune_job(PruneJob(model="mobilenetv2", out=tmp_path / "out", keep=11, calib_batches=1, batch_size=16,
                                 eval_budget=12))
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["calibration"]["input_shape"] == [1, 32, 32]  # grey data for a grey model
    assert len(plan["removed"]) == 2 and plan["k_choice"]["k"] == plan["k"] and plan["evaluations"] <= 12
    back = load_model(str(tmp_path / "out" / "model"))
    assert back.removed_units == plan["removed"] and len(back.model.blocks) == 10
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(back.model(x), res.pruned.eval()(x))


def test_heal_folds_into_the_inverted_residual_projection():
    """--heal linear works on this family: the channel map folds into the kept block's 1x1
    projection + BN (the branch output becomes M T), and healing never raises the calibration loss."""
    from sglp_edge.sglp.baselines import calibration_loss
    from sglp_edge.sglp.heal import fold, heal_linear

    m = _net(2)
    blk = m.blocks[4]
    z = torch.randn(2, 24, 6, 6)
    T = torch.randn(24, 24, dtype=torch.float64)
    with torch.no_grad():
        before = blk.conv(z).double()
        fold(blk, "conv_bn", T)
        after = blk.conv(z).double()
    assert torch.allclose(after, torch.einsum("bohw,oc->bchw", before, T), atol=1e-4)
    m = _net(3)
    a = get_adapter(m)
    g = torch.Generator().manual_seed(0)
    b = [(torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]
    removed = ["blocks.7", "blocks.8", "blocks.11"]
    healed, rep = heal_linear(m, a, removed, b)
    assert [r.before for r in rep.runs] == ["blocks.6", "blocks.10"]
    assert all(r.loss_before is not None for r in rep.runs)  # a map was fitted for every run
    assert calibration_loss(a, a.remove(healed, removed), b) <= calibration_loss(a, a.remove(m, removed), b) + 1e-6
