"""GradNorm selection: fixed batches, re-initialised random state, deterministic, bounded search."""

import math

import pytest
import torch

from exporters.errors import UserError
from sglp_edge.models.cifar_resnet import cifar_resnet
from sglp_edge.models.registry import get_adapter
from sglp_edge.sglp.importance import (CandidateScorer, allocate_removals, gradnorm, random_state_like,
                                       search_cost, select_in_segment)


def _setup(seed=0):
    torch.manual_seed(seed)
    m = cifar_resnet(20).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]
    return m, get_adapter(m), batches


def test_gradnorm_leaves_no_state_behind():
    m, a, b = _setup()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    v1 = gradnorm(m, a, b)
    v2 = gradnorm(m, a, b)
    assert v1 == v2 and v1 > 0
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN stats untouched (eval mode)


@pytest.mark.parametrize("protocol", ["natural", "reference"])
def test_ranking_identical_when_run_twice(protocol):
    units = ["layer1.0", "layer1.1", "layer1.2"]
    results = []
    for _ in range(2):
        m, a, b = _setup()
        sc = CandidateScorer(m, a, b, protocol=protocol, seed=7)
        sel = select_in_segment(sc, 0, units, 2, exhaustive_budget=10)
        results.append((sel.keep, sel.scores))
    assert results[0] == results[1]
    assert len(results[0][1]) == math.comb(3, 2)


def test_reference_protocol_resets_random_state_per_candidate():
    """Reference defect 1: the random copy must not accumulate pre-trained weights."""
    m, a, b = _setup()
    sc = CandidateScorer(m, a, b, protocol="reference", seed=3)
    units = ["layer1.0", "layer1.1", "layer1.2"]
    first = sc.score(units, ["layer1.0"])
    sc.score(units, ["layer1.1"])
    sc.score(units, ["layer1.2"])
    sc._cache.clear()
    assert sc.score(units, ["layer1.0"]) == first  # same candidate -> same network -> same score
    # units outside the candidate hold the random state, not the pre-trained weights
    work = sc._work
    assert not torch.equal(work.layer1[1].conv1.weight, m.layer1[1].conv1.weight)
    assert torch.equal(work.layer1[0].conv1.weight, m.layer1[0].conv1.weight)
    rs = random_state_like(m, 3)
    assert torch.equal(rs["layer2.1.conv1.weight"], work.layer2[1].conv1.weight)


def test_beam_matches_exhaustive_on_small_segment():
    units = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2"]
    m, a, b = _setup()
    ex = select_in_segment(CandidateScorer(m, a, b), 0, units, 3, exhaustive_budget=100)
    assert ex.method == "exhaustive" and ex.evaluations == math.comb(5, 3)
    sc = CandidateScorer(m, a, b)
    beam = select_in_segment(sc, 0, units, 3, exhaustive_budget=1, beam_width=10)
    assert beam.method.startswith("beam")
    assert beam.evaluations <= search_cost(5, 3, 1, 10)
    assert beam.keep == ex.keep  # wide beam over 5 units is exhaustive in effect


def test_allocate_removals_is_proportional_and_capped():
    assert allocate_removals([4, 4, 2], [5, 4, 2], 5) == [2, 2, 1]
    alloc = allocate_removals([9, 8, 8], [10, 9, 9], 13)
    assert sum(alloc) == 13 and all(a <= r for a, r in zip(alloc, [9, 8, 8]))
    # a segment of only removable units keeps at least one
    assert allocate_removals([3, 1], [3, 1], 2) == [2, 0]
    with pytest.raises(UserError):
        allocate_removals([2], [2], 2)


def test_unknown_protocol():
    m, a, b = _setup()
    with pytest.raises(UserError, match="protocol"):
        CandidateScorer(m, a, b, protocol="magic")


def test_build_up_beam_when_few_units_are_kept():
    units = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1"]
    m, a, b = _setup()
    ex = select_in_segment(CandidateScorer(m, a, b), 0, units, 2, exhaustive_budget=100)
    up = select_in_segment(CandidateScorer(m, a, b), 0, units, 2, exhaustive_budget=1, beam_width=100)
    assert up.method == "beam-up"
    assert up.keep == ex.keep  # an unbounded beam reaches every pair
    narrow = select_in_segment(CandidateScorer(m, a, b), 0, units, 2, exhaustive_budget=1, beam_width=1)
    assert narrow.evaluations <= search_cost(6, 2, 1, 1) == 6 + 5
