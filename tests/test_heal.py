"""Training-free linear healing (``--heal linear``) and the SLEB baseline.

The fold is checked exactly (the kept unit's branch output becomes ``M T``), the fit against its
own objective (the fitted map never reconstructs worse than the identity), and the healed LM
against ``from_pretrained`` (same logits after a save/reload)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sglp_edge.models.base import Unit
from sglp_edge.models.cifar_resnet import BasicBlock, CifarResNetAdapter, cifar_resnet
from sglp_edge.sglp.baselines import calibration_loss, select_baseline
from sglp_edge.sglp.heal import fold, heal_linear, removed_runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _units(n: int, fixed=()) -> list[Unit]:
    return [Unit(f"u{i}", i, i not in fixed, "") for i in range(n)]


def test_removed_runs_are_contiguous_with_the_kept_unit_before():
    units = _units(8)
    assert removed_runs(units, ["u0", "u1", "u3", "u5", "u6", "u7"]) == [(None, [0, 1]), (2, [3]), (4, [5, 6, 7])]
    assert removed_runs(units, []) == []


class _MLPUnit(nn.Module):
    def __init__(self, h=8, i=12, bias=True):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(i, h, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_fold_right_multiplies_the_branch_output(bias):
    torch.manual_seed(0)
    u = _MLPUnit(bias=bias)
    x = torch.randn(5, 12)
    T = torch.randn(8, 8, dtype=torch.float64)
    before = u.mlp.down_proj(x).double()
    fold(u, "linear", T)
    after = u.mlp.down_proj(x).double()
    assert torch.allclose(after, before @ T, atol=1e-5)


def test_conv_bn_fold_applies_a_channel_map_per_pixel():
    torch.manual_seed(0)
    blk = BasicBlock(6, 6).eval()
    with torch.no_grad():
        blk.bn2.running_mean.uniform_(-1, 1)
        blk.bn2.running_var.uniform_(0.5, 2)
        blk.bn2.weight.uniform_(0.5, 1.5)
        blk.bn2.bias.uniform_(-0.5, 0.5)
    z = torch.randn(2, 6, 5, 5)
    T = torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        before = blk.bn2(blk.conv2(z)).double()
        fold(blk, "conv_bn", T)
        after = blk.bn2(blk.conv2(z)).double()
    expect = torch.einsum("bohw,oc->bchw", before, T)
    assert torch.allclose(after, expect, atol=1e-4)


def test_conv_bn_fold_with_statistics_keeps_the_function_in_training_mode():
    """bn2 gets the statistics of the new conv output: eval mode is exact, and training mode (batch
    statistics) gives the same function on the data the statistics came from."""
    torch.manual_seed(0)
    blk = BasicBlock(6, 6).eval()
    with torch.no_grad():
        blk.bn2.running_mean.uniform_(-1, 1)
        blk.bn2.running_var.uniform_(0.5, 2)
    z = torch.randn(8, 6, 5, 5)
    T = torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        M = blk.bn2(blk.conv2(z)).double()
        rows = M.permute(0, 2, 3, 1).reshape(-1, 6)
        mean = rows.mean(0)
        cov = rows.t() @ rows / rows.shape[0] - torch.outer(mean, mean)
        fold(blk, "conv_bn", T, mean, cov)
        expect = torch.einsum("bohw,oc->bchw", M, T)
        assert torch.allclose(blk.bn2(blk.conv2(z)).double(), expect, atol=1e-4)
        blk.bn2.train()
        assert torch.allclose(blk.bn2(blk.conv2(z)).double(), expect, atol=1e-3)


@pytest.fixture(scope="module")
def quad():
    from test_finetune import quadrant_bundle, trained_teacher

    data = quadrant_bundle()
    return data, trained_teacher(data)


def test_cnn_heal_fits_better_than_identity_and_keeps_the_architecture(quad):
    data, teacher = quad
    ad = CifarResNetAdapter()
    batches = data.calibration_batches(2, 64, seed=0)
    removed = ["layer1.1", "layer1.2", "layer2.2", "layer3.1", "layer3.2"]
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    healed, rep = heal_linear(teacher, ad, removed, batches)
    assert [r.removed for r in rep.runs] == [["layer1.1", "layer1.2"], ["layer2.2"], ["layer3.1", "layer3.2"]]
    assert [r.before for r in rep.runs] == ["layer1.0", "layer2.1", "layer3.0"]
    for r in rep.runs:  # ridge towards the identity: the fit can only reconstruct better
        assert r.fit_rel_error_after <= r.fit_rel_error_before + 1e-9
        assert r.loss_before is not None and r.loss_after is not None
        assert r.applied == (r.loss_after < r.loss_before)
    pruned = ad.remove(healed, removed)
    plain = ad.remove(teacher, removed)
    assert [n for n, _ in pruned.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert calibration_loss(ad, pruned, batches) <= calibration_loss(ad, plain, batches) + 1e-6
    # the original is untouched
    assert all(torch.equal(original[k], v) for k, v in teacher.state_dict().items())


def test_lm_heal_reloads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sglp_edge.models.hf_llm import HFDecoderAdapter, save_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ad = HFDecoderAdapter()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (4, 16), generator=g) for _ in range(2)]
    removed = ["model.layers.0", "model.layers.2", "model.layers.3"]
    healed, rep = heal_linear(model, ad, removed, batches)
    assert rep.runs[0].before is None and not rep.runs[0].applied  # nothing before layer 0
    assert rep.runs[1].before == "model.layers.1" and rep.runs[1].removed == ["model.layers.2", "model.layers.3"]
    assert rep.runs[1].fit_rel_error_after <= rep.runs[1].fit_rel_error_before + 1e-9
    pruned = ad.remove(healed, removed)
    assert pruned.config.num_hidden_layers == 3
    if rep.runs[1].applied:  # the map is really in the weights
        assert not torch.equal(pruned.model.layers[0].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    save_hf(pruned, tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(again(batches[0]).logits, pruned(batches[0]).logits, atol=1e-5)


def test_sleb_removes_by_calibration_loss_and_finds_identity_blocks(quad):
    data, teacher = quad
    ad = CifarResNetAdapter()
    model = cifar_resnet(20, num_classes=4)
    model.load_state_dict(teacher.state_dict())
    model.eval()
    with torch.no_grad():  # two blocks whose residual branch is zero: relu(x + 0) = x (x >= 0), i.e. identity
        for name in ("layer1.2", "layer3.1"):
            blk = dict(model.named_modules())[name]
            blk.bn2.weight.zero_()
            blk.bn2.bias.zero_()
    batches = data.calibration_batches(1, 64, seed=0)
    full = calibration_loss(ad, model, batches)
    res = select_baseline("sleb", ad, model, None, batches, 2)
    # removing an identity block leaves the loss exactly as it was
    assert res.scores["layer1.2"] == pytest.approx(full, abs=1e-6)
    assert res.scores["layer3.1"] == pytest.approx(full, abs=1e-6)
    # the scores are the losses of the network without each unit, measured independently, and each
    # step removes the unit whose removal leaves the lowest loss, re-measured after the first removal
    removable = [u.name for u in ad.units(model) if u.removable]
    first = {}
    for n in removable:
        with ad.without_units(model, [n]):
            first[n] = calibration_loss(ad, model, batches)
    assert res.scores == pytest.approx(first, rel=1e-6)
    pick1 = min(removable, key=lambda n: first[n])
    second = {}
    for n in removable:
        if n != pick1:
            with ad.without_units(model, [pick1, n]):
                second[n] = calibration_loss(ad, model, batches)
    pick2 = min(second, key=lambda n: second[n])
    assert sorted(res.removed) == sorted([pick1, pick2])
