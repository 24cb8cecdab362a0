"""Layer-selection baselines (random, drop_last, ShortGPT block influence, angular distance)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, Unit
from sglp_edge.models.cifar_resnet import CifarResNetAdapter, cifar_resnet
from sglp_edge.sglp.baselines import (
    BASELINES,
    BaselineResult,
    block_influence_scores,
    capture_unit_io,
    select_baseline,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra intra-op threads only spin when the shared CPU is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

ADAPTER = CifarResNetAdapter()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet(20).eval()


def _batches(seed: int = 0, n: int = 2, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _make_identity(model: nn.Module, *names: str) -> None:
    """Zero conv2 of a BasicBlock: with eval-mode default BN its branch is 0, and relu(0 + x) = x
    because the block input is itself a ReLU output."""
    for name in names:
        blk = dict(model.named_modules())[name]
        with torch.no_grad():
            blk.conv2.weight.zero_()


@pytest.fixture(scope="module")
def setup():
    model = _model()
    return model, ADAPTER.units(model), _batches(n=1)


@pytest.mark.parametrize("method", list(BASELINES))
@pytest.mark.parametrize("n_remove", [0, 1, 3, 7])  # 7 = every removable unit of ResNet-20
def test_removes_exactly_n_removable_units_deterministically(setup, method, n_remove):
    model, units, batches = setup
    removable = {u.name for u in units if u.removable}
    assert len(removable) == 7
    res = select_baseline(method, ADAPTER, model, units, batches, n_remove, seed=3)
    assert isinstance(res, BaselineResult) and res.method == method
    assert len(res.removed) == n_remove == len(set(res.removed))
    assert set(res.removed) <= removable
    assert res.removed == [u.name for u in units if u.name in set(res.removed)]  # forward order
    again = select_baseline(method, ADAPTER, model, units, batches, n_remove, seed=3)
    assert again.removed == res.removed and again.scores == res.scores


def test_random_depends_on_seed():
    model = _model()
    units = ADAPTER.units(model)
    picks = {tuple(select_baseline("random", ADAPTER, model, units, [], 3, seed=s).removed) for s in range(8)}
    assert len(picks) > 1


def test_drop_last_takes_the_last_removable_units(setup):
    model, units, batches = setup
    res = select_baseline("drop_last", ADAPTER, model, units, batches, 3)
    assert res.removed == ["layer2.2", "layer3.1", "layer3.2"]  # layer3.0 changes shape and stays


def test_capture_unit_io_chains_inputs_and_outputs(setup):
    model, units, batches = setup
    model.train()
    io = capture_unit_io(ADAPTER, model, units, batches[0])
    assert model.training  # mode restored
    model.eval()
    assert len(io) == len(units)
    for (_, out_prev), (inp_next, _) in zip(io[:-1], io[1:]):
        assert torch.equal(out_prev, inp_next)
    assert io[0][0].shape == (4, 3, 8, 8)


def test_block_influence_identity_unit_scores_zero_and_goes_first():
    model = _model()
    _make_identity(model, "layer2.2")
    units = ADAPTER.units(model)
    batches = _batches()
    scores = block_influence_scores(ADAPTER, model, units, batches)
    assert scores["layer2.2"] == pytest.approx(0.0, abs=1e-12)
    assert min(v for k, v in scores.items() if k != "layer2.2") > 1e-3
    assert "stem" not in scores and "layer2.0" not in scores  # shape-changing: no BI
    res = select_baseline("block_influence", ADAPTER, model, units, batches, 1)
    assert res.removed == ["layer2.2"]


def test_angular_removes_the_identity_window():
    model = _model()
    _make_identity(model, "layer1.1", "layer1.2")
    units = ADAPTER.units(model)
    res = select_baseline("angular", ADAPTER, model, units, _batches(), 2)
    assert res.removed == ["layer1.1", "layer1.2"]
    assert res.scores["layer1.1"] == pytest.approx(0.0, abs=1e-6)
    assert set(res.scores) == {"layer1.0", "layer1.1", "layer2.1", "layer3.1"}  # every valid window start
    assert "fell back" not in res.notes


def test_angular_falls_back_to_greedy_when_no_window_exists():
    model = _model()
    identities = ["layer1.1", "layer2.1", "layer2.2", "layer3.2"]
    _make_identity(model, *identities)
    units = ADAPTER.units(model)
    res = select_baseline("angular", ADAPTER, model, units, _batches(), 4)  # longest removable run is 3
    assert "fell back" in res.notes
    assert res.removed == identities
    assert all(res.scores[n] == pytest.approx(0.0, abs=1e-6) for n in identities)
    # the model was restored after the temporary removals
    assert len(model.layer1) == 3 and len(model.layer2) == 3 and len(model.layer3) == 3


def test_bad_requests_raise_user_error(setup):
    model, units, batches = setup
    with pytest.raises(UserError, match="random, drop_last, block_influence, angular, sleb"):
        select_baseline("shortgpt", ADAPTER, model, units, batches, 1)
    with pytest.raises(UserError, match="at most 7"):
        select_baseline("random", ADAPTER, model, units, batches, 8)
    with pytest.raises(UserError, match="non-negative"):
        select_baseline("drop_last", ADAPTER, model, units, batches, -1)
    with pytest.raises(UserError, match="calibration batches"):
        select_baseline("block_influence", ADAPTER, model, units, [], 1)


# ---- a toy decoder: layers called with hidden_states as a keyword, tuple outputs, token masks ----

class _Layer(nn.Module):
    def __init__(self, scale: float, identity: bool = False):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.scale, self.identity = scale, identity

    def forward(self, hidden_states, attention_mask=None):
        if self.identity:
            return (hidden_states,)
        return (hidden_states + self.scale * torch.tanh(self.lin(hidden_states)),)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(11, 6)
        self.layers = nn.ModuleList([_Layer(1.0), _Layer(0.5, identity=True), _Layer(2.0), _Layer(0.1)])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(hidden_states=h, attention_mask=attention_mask)[0]
        return h


class _DecoderAdapter(ModelAdapter):
    family, modality = "toy_decoder", "tokens"

    @classmethod
    def matches(cls, model):
        return isinstance(model, _Decoder)

    def units(self, model):
        return [Unit(f"layers.{i}", i, True) for i in range(len(model.layers))]

    def forward(self, model, batch):
        return model(batch["input_ids"], batch.get("attention_mask"))


def test_token_models_keyword_inputs_and_masks():
    model, adapter = _Decoder().eval(), _DecoderAdapter()
    units = adapter.units(model)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    io = capture_unit_io(adapter, model, units, {"input_ids": ids})
    assert io[1][0].shape == (2, 5, 6) and torch.equal(io[1][0], io[1][1])
    masked = block_influence_scores(adapter, model, units, [{"input_ids": ids, "attention_mask": mask}])
    assert masked["layers.1"] == pytest.approx(0.0, abs=1e-12)
    # per-token mean over the 8 real tokens only, computed by hand
    x, y = io[0][0][mask.bool()].double(), io[0][1][mask.bool()].double()
    want = 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item()
    assert masked["layers.0"] == pytest.approx(want, abs=1e-9)
    res = select_baseline("angular", adapter, model, units, [{"input_ids": ids}], 2)
    assert len(res.removed) == 2 and "fell back" not in res.notes
