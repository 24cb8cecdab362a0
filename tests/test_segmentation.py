"""Fisher optimal segmentation, the CKA sequence, and the automatic choice of k."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.board.errors import UserError
from sglp_edge.sglp.segmentation import (
    choose_k,
    fisher_loss_table,
    fisher_segments,
    segmentation_loss,
    sequence_from_cka,
)


def _sse(x: np.ndarray, segs) -> float:
    return float(sum(((x[a:b] - x[a:b].mean()) ** 2).sum() for a, b in segs))


def _brute_force(x: np.ndarray, k: int) -> float:
    n = len(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        best = min(best, _sse(x, list(zip(bounds[:-1], bounds[1:]))))
    return best


sequences = st.lists(st.floats(-100, 100, allow_nan=False, allow_infinity=False), min_size=1, max_size=9)


@settings(max_examples=150, deadline=None)
@given(sequences)
def test_segmentation_equals_brute_force_for_every_k(values):
    x = np.array(values)
    n = len(x)
    table = fisher_loss_table(x, n)
    tol = 1e-9 * (1.0 + float((x ** 2).sum()))
    for k in range(1, n + 1):
        segs = fisher_segments(x, k)
        assert len(segs) == k
        assert segs[0][0] == 0 and segs[-1][1] == n
        assert all(a < b for a, b in segs)
        assert all(segs[i][1] == segs[i + 1][0] for i in range(k - 1))
        best = _brute_force(x, k)
        assert _sse(x, segs) == pytest.approx(best, abs=tol)
        assert table[k - 1] == pytest.approx(best, abs=tol)
        assert segmentation_loss(x, segs) == pytest.approx(best, abs=tol)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=30))
def test_loss_table_is_non_increasing_and_ends_at_zero(values):
    x = np.array(values)
    table = fisher_loss_table(x, len(x))
    scale = 1e-9 * (1.0 + float((x ** 2).sum()))
    assert np.all(np.diff(table) <= scale)
    assert table[-1] == pytest.approx(0.0, abs=scale)  # n singletons
    assert table[0] == pytest.approx(float(((x - x.mean()) ** 2).sum()), abs=scale)


def test_known_segmentation():
    x = [1.0, 1.1, 0.9, 5.0, 5.2, 4.9, 5.1, 9.0, 9.1]
    assert fisher_segments(x, 3) == [(0, 3), (3, 7), (7, 9)]
    assert fisher_segments(x, 1) == [(0, 9)]
    assert fisher_segments(x, 9) == [(i, i + 1) for i in range(9)]


def _plateaus(levels, lengths, noise, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.full(m, lv, dtype=float) for lv, m in zip(levels, lengths)])
    return x + noise * rng.standard_normal(x.size)


@pytest.mark.parametrize("seed", range(5))
def test_choose_k_finds_three_plateaus(seed):
    x = _plateaus([20.0, 14.0, 8.0], [10, 9, 9], 0.3, seed)  # 28 units like ResNet-56
    assert choose_k(x) == 3
    assert choose_k(x, rule="threshold") == 3
    assert fisher_segments(x, 3) == [(0, 10), (10, 19), (19, 28)]


def test_choose_k_finds_five_plateaus_below_the_cap():
    x = _plateaus([3.0, 9.0, 1.0, 6.0, 12.0], [6, 5, 6, 5, 6], 0.2, 11)
    assert choose_k(x, k_max=10) == 5


def test_choose_k_does_not_default_to_the_cap():
    # smooth / noisy sequences have no block structure: the rule must still stop well before the cap
    picks = [choose_k(np.random.default_rng(s).standard_normal(28), k_max=10) for s in range(40)]
    picks += [choose_k(np.linspace(0, 1, 28) ** 2 + 0.01 * np.random.default_rng(s).standard_normal(28), k_max=10)
              for s in range(40)]
    assert sum(p == 10 for p in picks) == 0
    assert all(1 <= p < 10 for p in picks)


def test_choose_k_edge_cases():
    assert choose_k(np.full(12, 4.2)) == 1  # constant: nothing to separate
    assert choose_k([1.0]) == 1
    assert choose_k([0.0, 0.0, 5.0, 5.0]) == 2  # k_max = 2 -> threshold rule
    assert choose_k(np.arange(20.0), k_max=5) in range(1, 5)


def test_sequence_from_cka():
    c = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.5], [0.2, 0.5, 1.0]])
    assert np.allclose(sequence_from_cka(c), [2.0, 2.3, 1.7])
    assert np.allclose(sequence_from_cka(c, mode="adjacent"), [0.8, 0.5, 0.5])
    assert np.allclose(sequence_from_cka(np.ones((1, 1)), mode="adjacent"), [1.0])


def test_bad_input_raises_user_error():
    x = np.arange(5.0)
    for bad_k in (0, 6, -1, 2.5):
        with pytest.raises(UserError, match="between 1 and"):
            fisher_segments(x, bad_k)
    with pytest.raises(UserError, match="k_max"):
        fisher_loss_table(x, 7)
    with pytest.raises(UserError, match="NaN"):
        fisher_segments([1.0, float("nan")], 1)
    with pytest.raises(UserError, match="1-D"):
        fisher_segments(np.zeros((2, 2)), 1)
    with pytest.raises(UserError, match="elbow, threshold"):
        choose_k(x, rule="largest")
    with pytest.raises(UserError, match="colsum, adjacent"):
        sequence_from_cka(np.eye(3), mode="rowsum")
    with pytest.raises(UserError, match="square"):
        sequence_from_cka(np.ones((2, 3)))
