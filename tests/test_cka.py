"""Linear CKA: direct (biased / unbiased) and the minibatch accumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.board.errors import UserError
from sglp_edge.models.base import capture_unit_outputs
from sglp_edge.models.cifar_resnet import CifarResNetAdapter, cifar_resnet
from sglp_edge.sglp.cka import MinibatchCKA, flatten_for_cka, linear_cka



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra intra-op threads only spin when the shared CPU is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def _pair(seed: int, n: int = 40, d1: int = 12, d2: int = 7, noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + noise * torch.randn(n, d2, generator=g,
                                                                                          dtype=torch.float64)
    return X, Y


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _kornblith(X: np.ndarray, Y: np.ndarray) -> float:
    """The classic feature-space formula, written independently of the module."""
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


@pytest.mark.parametrize("unbiased", [False, True])
def test_self_similarity_is_one(unbiased):
    X, _ = _pair(0)
    assert linear_cka(X, X, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), unbiased=st.booleans())
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(seed, scale, unbiased):
    X, Y = _pair(seed)
    ref = linear_cka(X, Y, unbiased=unbiased)
    Q1, Q2 = _orthogonal(X.shape[1], seed + 1), _orthogonal(Y.shape[1], seed + 2)
    assert linear_cka(X @ Q1, Y @ Q2, unbiased=unbiased) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(scale * X, Y / scale, unbiased=unbiased) == pytest.approx(ref, abs=1e-10)
    assert 0.0 < ref <= 1.0


def test_biased_matches_kornblith_feature_space_formula():
    for seed in range(3):
        X, Y = _pair(seed, n=30, d1=50, d2=9)
        assert linear_cka(X, Y) == pytest.approx(_kornblith(X.numpy(), Y.numpy()), rel=1e-12)


def test_unbiased_differs_from_biased_and_is_lower_for_unrelated_data():
    # independent high-dimensional data: biased CKA is inflated, unbiased stays near 0
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 500, generator=g, dtype=torch.float64)
    Y = torch.randn(20, 500, generator=g, dtype=torch.float64)
    assert linear_cka(X, Y) > 0.5
    assert abs(linear_cka(X, Y, unbiased=True)) < 0.1


def test_minibatch_single_batch_equals_direct_unbiased():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 4, 5, 5, generator=g, dtype=torch.float64)  # conv-shaped outputs
    feats = [base, base.relu() + 0.1 * torch.randn(16, 4, 5, 5, generator=g, dtype=torch.float64),
             torch.randn(16, 30, generator=g, dtype=torch.float64), base[:, :2] ** 2]
    acc = MinibatchCKA(len(feats))
    acc.update(feats)
    got = acc.compute()
    for i in range(len(feats)):
        for j in range(len(feats)):
            want = linear_cka(feats[i], feats[j], unbiased=True)
            assert got[i, j] == pytest.approx(want, abs=1e-12), (i, j)
    assert acc.n_batches == 1 and acc.n_examples == 16


def test_minibatch_several_batches_close_to_full_batch():
    X, Y = _pair(5, n=1000, d1=10, d2=6, noise=2.0)
    Z = torch.tanh(X[:, :4]) + 0.5 * torch.randn(1000, 4, generator=torch.Generator().manual_seed(9),
                                                 dtype=torch.float64)
    acc = MinibatchCKA(3)
    for b in range(8):
        sl = slice(125 * b, 125 * (b + 1))
        acc.update([X[sl], Y[sl], Z[sl]])
    got = acc.compute()
    feats = (X, Y, Z)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        full = linear_cka(feats[i], feats[j], unbiased=True)
        assert 0.1 < full < 0.95  # a non-trivial similarity
        assert got[i, j] == pytest.approx(full, abs=0.02)
    assert acc.n_batches == 8


def test_matrix_symmetric_unit_diagonal_and_bounded():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(12, 3, 4, 4, generator=g) for _ in range(5)]
    feats[3] = feats[1] * 2 + 0.01 * feats[3]
    acc = MinibatchCKA(5)
    acc.update(feats)
    acc.update([f.flip(0) for f in feats])  # the same distribution (the estimator sums HSIC)
    c = acc.compute()
    assert c.shape == (5, 5) and c.dtype == np.float64
    assert np.array_equal(c, c.T)
    assert np.all(np.diag(c) == 1.0)
    assert np.all(np.abs(c) <= 1.0)
    assert c[1, 3] > 0.99


def test_degenerate_units_give_zero_not_nan():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(10, 6, generator=g)
    const = torch.full((10, 6), 3.7)
    dead = torch.zeros(10, 2, 2, 2)
    acc = MinibatchCKA(3)
    acc.update([X, const, dead])
    c = acc.compute()
    assert not np.isnan(c).any()
    assert acc.degenerate == [1, 2]
    assert c[0, 1] == 0.0 and c[0, 2] == 0.0 and c[1, 2] == 0.0
    assert np.all(np.diag(c) == 1.0)
    assert linear_cka(X, const) == 0.0 and linear_cka(X, const, unbiased=True) == 0.0


def test_flatten_modes():
    h = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert flatten_for_cka(h).shape == (6, 4)
    assert flatten_for_cka(h, "sequence").shape == (2, 12)
    assert flatten_for_cka(torch.zeros(5, 2, 3, 3), "tokens").shape == (5, 18)  # conv: always per example
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = flatten_for_cka(h, mask=mask)
    assert torch.equal(rows, torch.stack([h[0, 0], h[0, 1], h[1, 0]]).double())
    assert flatten_for_cka(h).dtype == torch.float64
    with pytest.raises(UserError, match="mode"):
        flatten_for_cka(h, "pixels")
    with pytest.raises(UserError, match="mask"):
        flatten_for_cka(h, mask=torch.ones(3, 2))


def test_token_mode_matches_direct_on_token_rows():
    g = torch.Generator().manual_seed(6)
    h1 = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    h2 = h1 @ torch.randn(8, 8, generator=g, dtype=torch.float64) + torch.randn(3, 5, 8, generator=g,
                                                                                dtype=torch.float64)
    acc = MinibatchCKA(2, mode="tokens")
    acc.update([h1, h2])
    want = linear_cka(h1.reshape(15, 8), h2.reshape(15, 8), unbiased=True)
    assert acc.compute()[0, 1] == pytest.approx(want, abs=1e-12)
    seq = MinibatchCKA(2, mode="sequence")
    seq.update([h1.repeat(2, 1, 1), h2.repeat(2, 1, 1)])  # 6 sequences
    assert seq.compute()[0, 1] == pytest.approx(
        linear_cka(h1.repeat(2, 1, 1).reshape(6, -1), h2.repeat(2, 1, 1).reshape(6, -1), unbiased=True), abs=1e-12)


def test_max_rows_splits_batches_into_estimator_chunks():
    X, Y = _pair(7, n=25)
    split = MinibatchCKA(2, max_rows=10)
    split.update([X, Y])
    assert split.n_chunks == 3 and split.n_batches == 1
    manual = MinibatchCKA(2, max_rows=None)
    for a, b in ((0, 8), (8, 17), (17, 25)):  # the chunk bounds linspace(0, 25, 4).round()
        manual.update([X[a:b], Y[a:b]])
    assert np.allclose(split.hsic, manual.hsic, rtol=1e-12, atol=0)


def test_bad_input_raises_user_error():
    acc = MinibatchCKA(2)
    with pytest.raises(UserError, match="no minibatch"):
        acc.compute()
    with pytest.raises(UserError, match="expected outputs of 2 units"):
        acc.update([torch.zeros(8, 3)])
    with pytest.raises(UserError, match="at least 4 examples"):
        acc.update([torch.randn(3, 2), torch.randn(3, 2)])
    with pytest.raises(UserError, match="same minibatch"):
        acc.update([torch.randn(8, 2), torch.randn(9, 2)])
    with pytest.raises(UserError, match="mode"):
        MinibatchCKA(2, mode="bogus")
    with pytest.raises(UserError, match="at least 4"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2), unbiased=True)
    with pytest.raises(UserError, match="same examples"):
        linear_cka(torch.randn(6, 2), torch.randn(5, 2))


def test_cifar_resnet_units_end_to_end():
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    adapter = CifarResNetAdapter()
    units = adapter.units(model)
    acc = MinibatchCKA(len(units))
    for _ in range(2):
        acc.update(capture_unit_outputs(adapter, model, units, (torch.randn(8, 3, 16, 16), None)))
    c = acc.compute()
    assert c.shape == (len(units), len(units))
    assert np.isfinite(c).all() and np.array_equal(c, c.T)
    # residual blocks change the representation gradually: neighbours are more alike than the ends
    assert c[1, 2] > c[1, len(units) - 1]


def test_update_does_not_modify_the_callers_tensors():
    g = torch.Generator().manual_seed(8)
    feats = [torch.randn(9, 2, 3, 3, generator=g, dtype=torch.float64) + 5.0, torch.randn(9, 4, generator=g)]
    before = [f.clone() for f in feats]
    acc = MinibatchCKA(2, max_rows=5)
    acc.update(feats)
    assert all(torch.equal(a, b) for a, b in zip(feats, before))
