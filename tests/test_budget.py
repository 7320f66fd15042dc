"""Hardware-aware tree budget: latency curves, the budget choice on synthetic curves, measuring and caching."""

from __future__ import annotations

import json

import pytest

from leapdecode import GenerationConfig, speculate
from leapdecode.budget import (LatencyCurve, cached_latency_curve, choose_budget, curve_key, curve_path,
                               measure_latency, monotone)
from leapdecode.drafters.recycling import TokenRecycling
from leapdecode.drafters.registry import make_drafter
from leapdecode.models.tiny import tiny_model
from leapdecode.stats import Stats

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny forwards: see conftest.one_thread


SMALL_SIZES = (0, 1, 2, 4, 8)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", vocab_size=64, seed=1, num_hidden_layers=1)


def test_latency_interpolation():
    curve = LatencyCurve((0, 10, 20), (1.0, 1.0, 3.0))
    # flat between 0 and 10, then +0.2 s per node up to 20, then the last slope continues
    assert curve.latency(5) == 1.0 and curve.latency(15) == pytest.approx(2.0) and curve.latency(30) == 5.0
    assert curve.latency(0) == 1.0 and curve.max_size == 20
    assert curve.as_ms() == {"0": 1000.0, "10": 1000.0, "20": 3000.0}
    with pytest.raises(ValueError, match="increasing"):
        LatencyCurve((0, 4, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        LatencyCurve((0, 1), (1.0, 0.0))


def test_choose_budget_flat_then_linear():
    # 10 ms per step up to 32 nodes, then +1 ms per node; each node adds 0.1 expected tokens.
    # Up to 32 the rate (1 + 0.1 b) / 10 grows; past 32, d/db (1 + 0.1 b) / (10 + b - 32) has the sign of
    # 0.1 (b - 22) - (1 + 0.1 b) = -3.2 < 0, so it falls: the optimum is the knee, 32
    curve = LatencyCurve((0, 32, 128), (0.010, 0.010, 0.106))
    assert choose_budget(curve, lambda b: 1 + 0.1 * b) == 32
    # capped by max_budget: the rate only grows below 32, so the cap itself is best
    assert choose_budget(curve, lambda b: 1 + 0.1 * b, max_budget=20) == 20


def test_choose_budget_diminishing_returns():
    # latency 10 + b ms; node i adds 0.5^i tokens, so E(b) = 2 - 0.5^b.
    # rates: b=0 1/10 = .100, b=1 1.5/11 = .136, b=2 1.75/12 = .1458, b=3 1.875/13 = .1442: the optimum is 2
    curve = LatencyCurve((0, 100), (0.010, 0.110))
    assert choose_budget(curve, lambda b: 2 - 0.5**b) == 2
    # when drafting never pays (a node adds less than its cost), the answer is 0: plain decoding
    assert choose_budget(curve, lambda b: 1 + 0.01 * b) == 0
    # the drafter's own time per step counts too: 100 ms of fixed overhead for any draft makes b = 0 best again
    assert choose_budget(curve, lambda b: 2 - 0.5**b, overhead_seconds=lambda b: 0.1 if b else 0.0) == 0


def test_monotone():
    assert monotone([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]  # the violating pair (3, 2) becomes its mean
    assert monotone([3, 2, 1]) == [2, 2, 2]
    assert monotone([1, 2, 3]) == [1, 2, 3]


def test_measure_latency_on_a_tiny_model(tiny):
    runner = tiny.runner()
    curve = measure_latency(runner, sizes=SMALL_SIZES, repeats=2, context_len=32, key="k")
    assert curve.sizes == SMALL_SIZES and curve.key == "k"
    assert all(s > 0 for s in curve.seconds)
    assert list(curve.seconds) == sorted(curve.seconds)  # made non-decreasing
    assert runner.cache_len == 0  # the runner is left reset


def test_curve_cache(tiny, tmp_path):
    first = cached_latency_curve(tiny, cache_dir=tmp_path, sizes=SMALL_SIZES, repeats=1, context_len=16)
    path = curve_path(curve_key(tiny.name, tiny.device, tiny.dtype, tiny.runner_kind()), tmp_path)
    assert path.is_file() and json.loads(path.read_text())["sizes"] == list(SMALL_SIZES)
    assert "tiny-llama" in first.key and "cpu" in first.key and "float32" in first.key
    # a second start-up reads the file instead of measuring: plant recognisable numbers and get them back
    data = json.loads(path.read_text())
    data["seconds"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    path.write_text(json.dumps(data))
    again = cached_latency_curve(tiny, cache_dir=tmp_path, sizes=SMALL_SIZES, repeats=1, context_len=16)
    assert again.seconds == (1.0, 2.0, 3.0, 4.0, 5.0)
    # other sizes, a damaged file or remeasure=True measure again
    other = cached_latency_curve(tiny, cache_dir=tmp_path, sizes=(0, 2), repeats=1, context_len=16)
    assert other.sizes == (0, 2)
    path.write_text("{not json")
    assert cached_latency_curve(tiny, cache_dir=tmp_path, sizes=(0, 2), repeats=1, context_len=16).sizes == (0, 2)


def test_registry_builds_auto_budget_and_stats_report_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path))
    # plant a curve for the tiny model so the start-up reads it (flat to 4 nodes, then steep): no timing noise
    key = curve_key(tiny.name, tiny.device, tiny.dtype, tiny.runner_kind())
    planted = LatencyCurve((0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96), (0.01,) * 4 + (0.04, 0.08, 0.12, 0.16, 0.24,
                                                                              0.32, 0.48), key)
    path = curve_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(planted.to_json()))
    for name in ("recycling", "hybrid"):
        drafter = make_drafter(name, {}, target=tiny)
        recycling = getattr(drafter, "recycling", drafter)
        assert isinstance(recycling, TokenRecycling) and recycling.latency_curve == planted
        # beyond 4 nodes every node costs ~ a plain step while adding < 1 token: the choice stays within 4
        assert 1 <= recycling.tree_budget <= 4
        stats = Stats()
        config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
        list(speculate(tiny.runner(), [3, 9, 12, 5, 3, 9], drafter, config, stats=stats))
        assert stats.extra["tree_budget"] == recycling.tree_budget
        assert stats.extra["latency_curve_ms"]["8"] == 40.0
    # a fixed budget measures nothing and reports no curve
    fixed = make_drafter("recycling", {"tree_budget": "16"}, target=tiny)
    assert fixed.tree_budget == 16 and "latency_curve_ms" not in fixed.report()
