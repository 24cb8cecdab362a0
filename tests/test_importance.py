"""GradNorm selection: fixed batches, re-initialised random state, deterministic, bounded search."""

import math

import pytest
import torch

from benchmarks.board.errors import UserError
from sglp_edge.models.cifar_resnet import cifar_resnet
from sglp_edge.models.registry import get_adapter
from sglp_edge.sglp.allocation import adjacent_redundancy, allocate_removals, allocate_removals_by_redundancy
from sglp_edge.sglp.importance import CandidateScorer, gradnorm, random_state_like, search_cost, select_in_segment


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


def test_allocate_removals_by_redundancy_follows_the_most_redundant_units():
    segs = [range(0, 1), range(1, 5), range(5, 10)]
    removable = [False] + [True] * 9
    red = [0.1, 0.2, 0.3, 0.9, 0.8, 0.95, 0.99, 0.97, 0.4, 0.5]
    # top 4 removable by redundancy: 6, 7, 5, 3 -> three in the last segment, one in the middle
    assert allocate_removals_by_redundancy(segs, removable, red, 4) == [0, 1, 3]
    assert allocate_removals_by_redundancy(segs, removable, red, 7) == [0, 3, 4]  # every cap reached
    # a segment keeps at least one unit: the overflow goes to the next most redundant segment
    assert allocate_removals_by_redundancy([range(0, 2), range(2, 4)], [True] * 4, [0.9, 0.9, 0.1, 0.2], 2) == [1, 1]
    with pytest.raises(UserError, match="keeping one unit per segment"):
        allocate_removals_by_redundancy([range(0, 2)], [True, True], [0.5, 0.5], 2)
    cka = [[1.0, 0.3, 0.1], [0.3, 1.0, 0.8], [0.1, 0.8, 1.0]]
    assert adjacent_redundancy(cka) == [0.3, 0.3, 0.8]


def _tiny_llama(transformers):
    """A 6-layer random Llama, two fixed calibration batches of token ids, and its adapter."""
    from sglp_edge.models.hf_llm import HFDecoderAdapter

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)).eval()
    ids = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return lm, ids, HFDecoderAdapter()


def test_allocation_auto_is_redundancy_for_decoder_lms_and_proportional_for_cnns():
    transformers = pytest.importorskip("transformers")
    from sglp_edge.sglp.allocation import allocate_removals_by_redundancy as by_red
    from sglp_edge.sglp.plan import PruneConfig
    from sglp_edge.sglp.prune import analyze

    lm, ids, ad = _tiny_llama(transformers)
    plan = analyze(lm, ad, ids, ids[:1], PruneConfig(keep=4, k=2, eval_budget=None))
    assert plan.allocation == "redundancy"
    removed = set(plan.removed)
    per_seg = [sum(f"model.layers.{i}" in removed for i in range(a, b)) for a, b in plan.segments]
    want = by_red([range(a, b) for a, b in plan.segments], [True] * 6, adjacent_redundancy(plan.cka), 2)
    assert per_seg == want
    prop = analyze(lm, ad, ids, ids[:1], PruneConfig(keep=4, k=2, eval_budget=None, allocation="proportional"))
    assert prop.allocation == "proportional"
    assert [sum(f"model.layers.{i}" in prop.removed for i in range(a, b)) for a, b in prop.segments] == \
        allocate_removals([b - a for a, b in prop.segments], [b - a for a, b in prop.segments], 2)
    m, a, b = _setup()
    assert analyze(m, a, b, b, PruneConfig(keep=8, k=3, eval_budget=None)).allocation == "proportional"
    with pytest.raises(UserError, match="allocation"):
        analyze(m, a, b, b, PruneConfig(keep=8, allocation="magic"))


def test_unknown_protocol():
    m, a, b = _setup()
    with pytest.raises(UserError, match="protocol"):
        CandidateScorer(m, a, b, protocol="magic")
    from sglp_edge.sglp.plan import PruneConfig
    from sglp_edge.sglp.prune import analyze

    with pytest.raises(UserError, match="unknown protocol 'magic'"):
        analyze(m, a, b, b, PruneConfig(keep=8, protocol="magic"))


def test_protocol_auto_is_the_loss_score_for_decoder_lms_and_cnns_and_natural_gradnorm_for_encoders():
    transformers = pytest.importorskip("transformers")
    from sglp_edge.sglp.importance import resolve_protocol
    from sglp_edge.sglp.plan import PruneConfig
    from sglp_edge.sglp.prune import analyze

    assert PruneConfig().protocol == "auto"
    assert [resolve_protocol("auto", m) for m in ("tokens", "image", "sentences")] == ["loss", "loss", "natural"]
    assert resolve_protocol("reference", "tokens") == "reference"
    lm, ids, ad = _tiny_llama(transformers)
    auto = analyze(lm, ad, ids, ids[:1], PruneConfig(keep=4, k=1, eval_budget=None))
    loss = analyze(lm, ad, ids, ids[:1], PruneConfig(keep=4, k=1, eval_budget=None, protocol="loss"))
    assert auto.config["protocol"] == "loss" and auto.removed == loss.removed
    # one segment, exhaustive: the kept pair is the one with the lowest calibration loss
    import itertools

    from sglp_edge.sglp.importance import CandidateScorer as CS

    scorer = CS(lm, ad, ad.with_targets(lm, ids[:1]), protocol="loss")
    names = [u.name for u in ad.units(lm)]
    best = min(itertools.combinations(names, 4), key=lambda kept: scorer.score(names, list(kept)))
    assert set(auto.removed) == set(names) - set(best)
    m, a, b = _setup()
    plan = analyze(m, a, b, b, PruneConfig(keep=8, k=3, eval_budget=None))
    assert plan.config["protocol"] == "loss" and any("--protocol auto" in n for n in plan.notes), plan.notes


def test_build_up_beam_when_few_units_are_kept():
    units = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1"]
    m, a, b = _setup()
    ex = select_in_segment(CandidateScorer(m, a, b), 0, units, 2, exhaustive_budget=100)
    up = select_in_segment(CandidateScorer(m, a, b), 0, units, 2, exhaustive_budget=1, beam_width=100)
    assert up.method == "beam-up"
    assert up.keep == ex.keep  # an unbounded beam reaches every pair
    narrow = select_in_segment(CandidateScorer(m, a, b), 0, units, 2, exhaustive_budget=1, beam_width=1)
    assert narrow.evaluations <= search_cost(6, 2, 1, 1) == 6 + 5


def test_budgeted_greedy_respects_its_budget_and_keeps_the_count():
    units = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1"]
    m, a, b = _setup()
    sc = CandidateScorer(m, a, b)
    sel = select_in_segment(sc, 0, units, 3, exhaustive_budget=1, max_evaluations=10, direction="down")
    assert sel.method.startswith("greedy-down") and sel.evaluations <= 10
    assert len(sel.keep) == 3 and set(sel.keep) | set(sel.remove) == set(units)
    one = select_in_segment(CandidateScorer(m, a, b), 0, units, 3, exhaustive_budget=1, max_evaluations=6,
                            direction="down")
    assert one.method == "oneshot-down" and one.evaluations == 6
    # one-shot keeps the units whose single removal hurts most (natural protocol: highest GradNorm)
    singles = {u: CandidateScorer(m, a, b).score(units, [v for v in units if v != u]) for u in units}
    assert set(one.keep) == set(sorted(units, key=singles.__getitem__)[3:])
    with pytest.raises(UserError, match="eval-budget"):
        select_in_segment(CandidateScorer(m, a, b), 0, units, 3, exhaustive_budget=1, max_evaluations=5)


def test_unlimited_greedy_budget_equals_beam_of_width_one():
    units = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1"]
    m, a, b = _setup()
    beam = select_in_segment(CandidateScorer(m, a, b), 0, units, 3, exhaustive_budget=1, beam_width=1, direction="down")
    # a budget just under the width-2 beam's cost but enough for full greedy steps (6 + 5 + 4)
    greedy = select_in_segment(CandidateScorer(m, a, b), 0, units, 3, exhaustive_budget=1, beam_width=2,
                               max_evaluations=16, direction="down")
    assert greedy.method.startswith("greedy") and greedy.keep == beam.keep


def test_split_budget_water_fills():
    from sglp_edge.sglp.allocation import split_budget

    assert split_budget([10, 20], [2, 3], 100) == [10, 20]  # everything fits
    assert split_budget([10, 200, 300], [2, 10, 10], 100) == [10, 45, 45]
    assert sum(split_budget([50, 60, 70], [5, 6, 7], 40)) <= 40
    with pytest.raises(UserError, match="eval-budget"):
        split_budget([50, 60], [30, 30], 40)


def test_k_is_raised_until_the_search_fits_the_budget():
    import numpy as np

    from sglp_edge.sglp.plan import PruneConfig
    from sglp_edge.sglp.selection import fit_k_to_budget, search_need
    from sglp_edge.sglp.segmentation import fisher_segments

    m = cifar_resnet(56)
    units = get_adapter(m).units(m)
    x = np.sin(np.linspace(0, 3, len(units)))  # smooth: no plateaus, the elbow picks few segments
    cfg = PruneConfig(keep=14, eval_budget=80)
    k, raised = fit_k_to_budget(x, units, 3, 10, 14, cfg)
    assert raised == 3 and k > 3
    assert search_need(units, fisher_segments(x, k), 14, cfg) <= 80
    assert search_need(units, fisher_segments(x, k - 1), 14, cfg) is None or \
        search_need(units, fisher_segments(x, k - 1), 14, cfg) > 80
    assert fit_k_to_budget(x, units, 3, 10, 14, PruneConfig(keep=14, eval_budget=None)) == (3, None)


def test_loss_protocol_scores_the_calibration_loss_and_lowest_wins():
    from sglp_edge.sglp.baselines import calibration_loss

    m, a, b = _setup()
    units = ["layer1.0", "layer1.1", "layer1.2"]
    sc = CandidateScorer(m, a, b, protocol="loss")
    assert not sc.higher_is_better
    sel = select_in_segment(sc, 0, units, 1, exhaustive_budget=10)
    losses = {}
    for keep in units:
        with a.without_units(m, [u for u in units if u != keep]):
            losses[keep] = calibration_loss(a, m, b)
    assert sel.keep == [min(losses, key=losses.get)]
    assert sorted(sel.scores.values()) == pytest.approx(sorted(losses.values()), rel=1e-6)
    assert all(p.grad is None for p in m.parameters())  # forward only


def test_healed_protocol_scores_the_loss_after_linear_healing_and_lowest_wins():
    from sglp_edge.sglp.baselines import calibration_loss
    from sglp_edge.sglp.heal import heal_linear

    m, a, b = _setup()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    units = ["layer2.1", "layer2.2", "layer3.1"]
    sc = CandidateScorer(m, a, b, protocol="healed")
    assert not sc.higher_is_better
    sel = select_in_segment(sc, 1, units, 1, exhaustive_budget=10)
    healed_loss, plain_loss = {}, {}
    for keep in units:
        removed = [u for u in units if u != keep]
        healed, _ = heal_linear(m, a, removed, b)
        with a.without_units(healed, removed):
            healed_loss[keep] = calibration_loss(a, healed, b)
        with a.without_units(m, removed):
            plain_loss[keep] = calibration_loss(a, m, b)
    assert sel.keep == [min(healed_loss, key=healed_loss.get)]
    assert sorted(sel.scores.values()) == pytest.approx(sorted(healed_loss.values()), rel=1e-6)
    # a heal is kept only where it lowers the calibration loss: never above the un-healed loss
    assert all(healed_loss[k] <= plain_loss[k] + 1e-6 for k in units)
    # every fit works on a copy: the scorer's network is untouched
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
