"""benchmarks/experiments/paired.py: the shared "ratio of two latencies" method (issue 29). The timers here are
scripted figures, not clocks, so what is checked is the method: the alternating order, the median
of per-pass ratios, the re-measure above the physical limit, and the fault when it persists."""

import pytest

from benchmarks.experiments.paired import MeasuringFault, alternating, alternating_rounds, paired_ratio, ratio_of


def scripted(values, calls, name):
    it = iter(values)

    def f():
        calls.append(name)
        return next(it)
    return f


def test_passes_alternate_and_the_ratio_is_the_median_of_per_pass_ratios():
    calls = []
    a = scripted([10.0, 12.0, 30.0, 11.0, 10.0], calls, "a")
    b = scripted([5.0, 6.0, 5.0, 5.0, 4.0], calls, "b")
    r = alternating(a, b, 5)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert r["rounds_ratio"] == [2.0, 2.0, 6.0, 2.2, 2.5]
    assert r["ratio"] == 2.2  # the 6.0 pass (A hit by another process) does not move it
    assert r["spread"] == [2.0, 6.0] and r["passes"] == 5
    assert r["a"] == 11.0 and r["b"] == 5.0 and len(r["loadavg"]) == 2


def test_a_ratio_above_its_limit_is_measured_again_and_never_returned():
    calls = []
    a = scripted([30.0] * 3 + [20.0] * 3, calls, "a")
    b = scripted([10.0] * 6, calls, "b")
    r = paired_ratio(a, b, passes=3, limit=2.112)
    assert r["ratio"] == 2.0 and r["attempt"] == 2
    assert [f["ratio"] for f in r["faults"]] == [3.0]


def test_a_persistent_fault_raises_instead_of_reporting():
    a = scripted([30.0] * 9, [], "a")
    b = scripted([10.0] * 9, [], "b")
    with pytest.raises(MeasuringFault, match="above its physical limit 2.112") as e:
        paired_ratio(a, b, passes=3, limit=2.112, retries=2)
    assert [f["ratio"] for f in e.value.attempts] == [3.0, 3.0, 3.0]


def test_within_tolerance_of_the_limit_is_a_result():
    r = paired_ratio(scripted([2.15] * 3, [], "a"), scripted([1.0] * 3, [], "b"), passes=3, limit=2.112)
    assert r["ratio"] == pytest.approx(2.15) and r["faults"] == []  # 1.8 % above: timer resolution, not a fault


def test_many_armed_rounds_reverse_the_order_and_ratios_pair_by_round():
    calls = []
    rr = alternating_rounds({"o": scripted([4.0, 8.0, 4.0], calls, "o"), "p": scripted([2.0, 2.0, 1.0], calls, "p"),
                             "q": scripted([1.0, 1.0, 1.0], calls, "q")}, 3)
    assert calls == ["o", "p", "q", "q", "p", "o", "o", "p", "q"]
    r = ratio_of(rr, "o", "p", limit=3.0)
    assert r["rounds_ratio"] == [2.0, 4.0, 4.0] and r["ratio"] == 4.0 and r["fault"] is True
    assert ratio_of(rr, "o", "p", limit=5.0)["fault"] is False and ratio_of(rr, "o", "p")["fault"] is False


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_non_positive_timing_is_an_error(bad):
    with pytest.raises(ValueError, match="must be > 0"):
        alternating(lambda: bad, lambda: 1.0, 1)
