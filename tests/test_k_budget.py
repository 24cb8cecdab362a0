"""--k-budget: 'search' keeps the k rule's k and spends the evaluation budget inside the segments;
'raise' (the default, measured better on ResNet-56) raises k to fit the budget; plan.json says why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.board.errors import UserError
from sglp_edge.models.cifar_resnet import cifar_resnet
from sglp_edge.models.registry import get_adapter
from sglp_edge.sglp.plan import PruneConfig
from sglp_edge.sglp.prune import analyze
from sglp_edge.sglp.selection import choose_k_auto, fit_k_to_budget, search_need
from sglp_edge.sglp.segmentation import choose_k, elbow_curve, fisher_segments


def _r56_units():
    m = cifar_resnet(56)
    return get_adapter(m).units(m)


def test_elbow_curve_is_what_choose_k_reads():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.full(6, 1.0), np.full(8, 5.0), np.full(7, 2.0)]) + 0.01 * rng.standard_normal(21)
    c = elbow_curve(x, 10)
    assert len(c["loss_by_k"]) == len(c["elbow_distance_by_k"]) == 10
    assert int(np.argmax(c["elbow_distance_by_k"])) + 1 == choose_k(x, 10) == 3
    assert c["elbow_distance_by_k"][0] == pytest.approx(0.0) and c["elbow_distance_by_k"][-1] == pytest.approx(0.0)
    assert elbow_curve(np.ones(8), 4)["elbow_distance_by_k"] == [0.0] * 4  # constant: no span, no elbow


def test_search_keeps_the_rule_k_and_raise_restores_the_old_behaviour():
    units = _r56_units()
    x = np.sin(np.linspace(0, 3, len(units)))  # the elbow picks few segments here
    rule_k = choose_k(x, 10)
    assert PruneConfig().k_budget == "raise"  # the default, chosen by the measurement in benchmarks/results/k-budget.md
    k, by, rec = choose_k_auto(x, units, 10, 14, PruneConfig(keep=14, eval_budget=80, k_budget="search"), None)
    assert k == rule_k == rec["rule_k"] == rec["k"] and by == "elbow"
    assert rec["k_budget"] == "search" and rec["eval_budget"] == 80
    need = rec["search_need_by_k"][str(k)]
    assert need == search_need(units, fisher_segments(x, k), 14, PruneConfig(keep=14)) and need > 80
    assert "kept (--k-budget search)" in rec["why"] and str(need) in rec["why"]
    assert len(rec["loss_by_k"]) == 10
    k2, by2, rec2 = choose_k_auto(x, units, 10, 14, PruneConfig(keep=14, eval_budget=80, k_budget="raise"), None)
    assert (k2, rec2["rule_k"]) == (fit_k_to_budget(x, units, rule_k, 10, 14, PruneConfig(keep=14))[0], rule_k)
    assert k2 > rule_k and by2 == "elbow+budget" and "raised" in rec2["why"] and "note" in rec2


def test_plan_records_why_k_and_how_the_budget_was_spent():
    torch.manual_seed(0)
    m = cifar_resnet(20).eval()
    a = get_adapter(m)
    g = torch.Generator().manual_seed(1)
    b = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    plan = analyze(m, a, b, b, PruneConfig(keep=5, eval_budget=12, k_budget="search"))
    kc, bud = plan.k_choice, plan.budget
    assert plan.k == kc["k"] == choose_k(plan.sequence, kc["k_max"])  # the rule's k, not the budget's
    assert kc["loss_by_k"] == pytest.approx(plan.loss_table[: kc["k_max"]])
    assert bud["eval_budget"] == 12 and sum(bud["shares"]) <= 12
    assert bud["spent"] == [s["evaluations"] for s in plan.selections] and sum(bud["spent"]) == plan.evaluations <= 12
    assert bud["removals"] and sum(bud["removals"]) == len(plan.removed)
    assert bud["search"] == [s["method"] for s in plan.selections] and bud["why"]
    old = analyze(m, a, b, b, PruneConfig(keep=5, eval_budget=12, k_budget="raise"))
    assert old.k_choice["k_budget"] == "raise" and old.k >= plan.k
    with pytest.raises(UserError, match="k-budget"):
        analyze(m, a, b, b, PruneConfig(keep=5, k_budget="more"))
