"""The load generator's arithmetic: latency quantiles and the report's speed-up column."""

from __future__ import annotations

from leapdecode.serve.loadgen import LevelResult, RequestResult, _quantile, markdown


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
