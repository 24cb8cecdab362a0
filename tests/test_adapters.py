"""Model adapters: unit lists, removability, real removal, save/reload."""

import json

import pytest
import torch

from benchmarks.board.errors import UserError
from sglp_edge.models.base import AdapterError
from sglp_edge.models.cifar_resnet import cifar_resnet
from sglp_edge.models.registry import get_adapter, load_checkpoint, load_model, save_checkpoint

VISION = [
    # name, input size, units, removable
    ("cifar_resnet20", 32, 10, 7),
    ("cifar_resnet56", 32, 28, 25),
    ("torchvision:resnet18", 64, 9, 5),
    ("torchvision:resnet50", 64, 17, 12),
    ("torchvision:vgg16_bn", 64, 13, 9),
    ("torchvision:mobilenet_v2", 64, 17, 10),
    ("torchvision:efficientnet_b0", 64, 16, 9),
]


@pytest.mark.parametrize("name,size,n_units,n_removable", VISION)
def test_units_and_real_removal(name, size, n_units, n_removable):
    torch.manual_seed(0)
    lm = load_model(name, num_classes=10)
    units = lm.adapter.units(lm.model)
    assert len(units) == n_units
    assert sum(u.removable for u in units) == n_removable
    assert [u.index for u in units] == list(range(n_units))
    assert all(u.reason for u in units if not u.removable)
    removable = [u.name for u in units if u.removable]
    drop = removable[::2]
    pruned = lm.adapter.remove(lm.model, drop)
    # a genuinely smaller network: fewer parameters, fewer units, still runs
    assert len(lm.adapter.units(pruned)) == n_units - len(drop)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in lm.model.parameters())
    out = pruned.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    # the original is untouched
    assert len(lm.adapter.units(lm.model)) == n_units


def test_vit_blocks_are_units():
    lm = load_model("torchvision:vit_b_32", num_classes=10)
    units = lm.adapter.units(lm.model)
    assert len(units) == 12 and all(u.removable for u in units)
    pruned = lm.adapter.remove(lm.model, [units[3].name, units[7].name])
    assert len(pruned.encoder.layers) == 10
    assert pruned.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_non_removable_unit_is_refused():
    m = cifar_resnet(20)
    a = get_adapter(m)
    with pytest.raises(AdapterError, match="cannot be removed"):
        a.remove(m, ["layer2.0"])
    with pytest.raises(AdapterError, match="unknown unit"):
        a.remove(m, ["layer9.0"])


def test_without_units_restores_structure():
    torch.manual_seed(0)
    m = cifar_resnet(20).eval()
    a = get_adapter(m)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    with a.without_units(m, ["layer1.1", "layer3.2"]) as tmp:
        assert len(tmp.layer1) == 2 and len(tmp.layer3) == 2
        assert not torch.allclose(tmp(x), ref)
    assert len(m.layer1) == 3 and torch.allclose(m(x), ref)


def test_checkpoint_roundtrip_with_two_pruning_rounds(tmp_path):
    torch.manual_seed(0)
    m = cifar_resnet(20).eval()
    a = get_adapter(m)
    p1 = a.remove(m, ["layer1.1"])
    p2 = a.remove(p1, ["layer1.1", "layer3.2"])  # names of p1
    save_checkpoint(p2, a, tmp_path / "ck", spec=a.spec(m), removed_units=[["layer1.1"], ["layer1.1", "layer3.2"]])
    loaded = load_checkpoint(tmp_path / "ck")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.model(x), p2.eval()(x))
    assert len(a.units(loaded.model)) == 7


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    m = cifar_resnet(20)
    a = get_adapter(m)
    save_checkpoint(m, a, tmp_path / "ck")
    st = tmp_path / "ck" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    meta = tmp_path / "ck" / "sglp_model.json"
    meta.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")


def test_user_weights_loaded_weights_only(tmp_path):
    m = cifar_resnet(20)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    lm = load_model("cifar_resnet20", weights=tmp_path / "w.pt")
    assert torch.equal(lm.model.fc.weight, m.fc.weight)
    # a pickle holding code is refused by weights_only loading
    torch.save({"state_dict": m.state_dict(), "fn": json.dumps}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="weights-only"):
        load_model("cifar_resnet20", weights=tmp_path / "bad.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:500])
    with pytest.raises(UserError):
        load_model("cifar_resnet20", weights=tmp_path / "trunc.pt")


def test_unknown_architecture_names_families_and_units_flag():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))

        def forward(self, x):
            return self.body(x)

    with pytest.raises(AdapterError) as e:
        get_adapter(Odd())
    assert "--units" in str(e.value) and "ResNet" in str(e.value)
    a = get_adapter(Odd(), units="body.*")
    a.check_shapes(Odd(), (torch.randn(2, 4), None))
    assert [u.name for u in a.units(Odd())] == ["body.0", "body.1", "body.2"]


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model"):
        load_model("resnet9000")
    with pytest.raises(UserError, match="does not exist"):
        load_model("/nonexistent/dir/model.pt")
