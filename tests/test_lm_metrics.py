"""The causal-LM task's derived metrics: perplexity against the unpruned model (same runtime) and
against PyTorch FP32 (same model, same blocks), and the INT8 deploy profiles that limit the latter."""

import pytest

from sglp_edge.profiles.load import load_profile
from sglp_edge.tasks import get_task


def test_perplexity_increase_and_cost_against_pytorch():
    t = get_task("causal-lm")
    res = {"original": {"metrics": {"perplexity": 20.0}},
           "pruned": {"metrics": {"perplexity": 22.0, "torch_perplexity": 21.78}}}
    d = t.derived_metrics(res)
    assert d["perplexity_increase_pct"] == pytest.approx(10.0)
    assert d["perplexity_vs_pytorch_pct"] == pytest.approx(100 * (22.0 / 21.78 - 1))
    # no PyTorch reference (an older eval npz, a llama.cpp text that did not round-trip): not derived
    d = t.derived_metrics({"original": res["original"], "pruned": {"metrics": {"perplexity": 22.0}}})
    assert "perplexity_vs_pytorch_pct" not in d and "perplexity_increase_pct" in d


@pytest.mark.parametrize("name", ["local-cpu-genai-lm-int8", "local-cpu-openvino-lm-int8", "local-cpu-llamacpp-lm"])
def test_int8_profiles_hold_quality_by_perplexity(name):
    p = load_profile(name)
    cons = {c.metric: (c.op, c.limit) for c in p.constraints}
    assert p.task == "causal-lm" and p.precision == "int8"
    assert cons["perplexity_vs_pytorch_pct"] == ("<=", 2.0) and cons["perplexity_increase_pct"] == ("<=", 10.0)
    assert "greedy_agreement_pct" not in cons  # reported, not limited: free-running greedy text at 8 bits
