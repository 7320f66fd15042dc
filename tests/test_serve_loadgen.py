"""The load generator's arithmetic: latency quantiles, the report's speed-up column and its interval."""

from __future__ import annotations

import math

import pytest

from leapdecode.serve.loadgen import LevelResult, RequestResult, _quantile, markdown, ratio_interval


def result(latency: float, tokens: int, text: str = "x") -> RequestResult:
    return RequestResult(True, latency, latency / 4, tokens, text, 1.5)


def test_nearest_rank_quantiles():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert _quantile(values, 0.5) == 10.0  # ceil(0.5 * 20) = 10th smallest
    assert _quantile(values, 0.95) == 19.0  # ceil(0.95 * 20) = 19th smallest
    assert _quantile([3.0], 0.95) == 3.0


def test_report_speedup_and_identity():
    off = LevelResult("none", 4, wall=10.0, results=[result(1.0, 100, "a"), result(2.0, 100, "b")])
    on = LevelResult("copy", 4, wall=5.0, results=[result(0.5, 100, "a"), result(1.0, 100, "c")])
    assert off.tokens_per_second == 20.0 and on.tokens_per_second == 40.0  # 200 tokens in 10 s and in 5 s
    report = markdown([on, off], "copy", {"note": "test"})
    lines = report.splitlines()
    assert lines[0] == "- note: test"
    assert "| 4 | off (none) | 2/2 | 20.0 |" in report and "| 1.00x |" in report
    assert "| 4 | on (copy) | 2/2 | 40.0 |" in report and "| 2.00x |" in report
    # request 0 said "a" both times, request 1 said "b" off and "c" on
    assert "Greedy outputs identical with speculation on and off: 1/2." in report


def test_speedup_interval_is_a_t_interval_on_log_ratios():
    # logs 0, log 1.1, 2 log 1.1: mean log 1.1, standard deviation log 1.1; t(0.975, 2 df) = 4.303
    mean, low, high = ratio_interval([1.0, 1.1, 1.21])
    half = 4.303 * math.log(1.1) / math.sqrt(3)
    assert mean == pytest.approx(1.1) and low == pytest.approx(1.1 * math.exp(-half))
    assert high == pytest.approx(1.1 * math.exp(half)) and low < 1.0 < high  # three rounds say little
    assert ratio_interval([1.05] * 5) == pytest.approx((1.05, 1.05, 1.05))
    mean, low, high = ratio_interval([1.02, 1.04, 1.03, 1.05, 1.01, 1.03, 1.04, 1.02])
    assert 1.0 < low < mean < high < 1.05  # eight steady rounds: above 1 with confidence
    with pytest.raises(ValueError, match="ratios"):
        ratio_interval([1.1])


def test_report_gives_the_interval_from_three_rounds_on():
    def level(name, rnd, wall):
        r = LevelResult(name, 16, wall=wall, results=[result(1.0, 100)])
        r.round = rnd
        return r
    two = [level("none", 0, 10.0), level("copy", 0, 9.0), level("none", 1, 10.0), level("copy", 1, 10.0)]
    assert "geometric mean" not in markdown(two, "copy", {})
    three = two + [level("none", 2, 10.0), level("copy", 2, 9.5)]
    report = markdown(three, "copy", {})
    assert "speed-up per round: 1.11x, 1.00x, 1.05x; geometric mean 1.054x, 95% interval" in report
