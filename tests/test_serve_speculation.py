"""The server's draft-length policy: acceptance estimates, the step cost model and the choice of k."""

from __future__ import annotations

import random

import numpy as np
import pytest

from leapdecode.draft_length import (AcceptanceEstimate, DrafterCalibration, DrafterUpkeep, StepCost,
                                    choose_draft_length, choose_draft_lengths, own_draft_length, plan_draft_lengths)


def estimate_with(rate: float, proposal: float = 1.0) -> AcceptanceEstimate:
    """An estimate whose evidence is overwhelming: its rates are `rate` and `proposal` to five decimals."""
    return AcceptanceEstimate(tried=1e6, accepted=rate * 1e6, offered=1e6, proposed=proposal * 1e6)


def test_estimate_counts_tried_positions():
    e = AcceptanceEstimate(prior_rate=0.5, prior_proposal=0.5, prior_weight=2.0, decay=1.0)
    # a 4-long draft with 2 accepted: positions 1 and 2 accepted, position 3 tried and rejected -> 3 tried
    e.observe(offered=8, drafted_depth=4, accepted=2)
    assert (e.tried, e.accepted) == (3.0, 2.0)
    # (2 + 0.5 * 2) / (3 + 2) = 0.6
    assert e.rate == pytest.approx(0.6)
    # a fully accepted 3-long draft: 3 tried, 3 accepted, nothing rejected
    e.observe(offered=8, drafted_depth=3, accepted=3)
    assert (e.tried, e.accepted) == (6.0, 5.0)
    # offered twice, proposed twice; then offered once with no proposal: (2 + 0.5 * 2) / (3 + 2) = 0.6
    e.observe(offered=8, drafted_depth=0, accepted=0)
    assert (e.offered, e.proposed) == (3.0, 2.0) and e.proposal_rate == pytest.approx(0.6)
    e.observe(offered=0, drafted_depth=0, accepted=0)  # nothing offered: no evidence about proposing
    assert e.offered == 3.0


def test_estimate_forgets_and_returns_to_the_prior():
    e = AcceptanceEstimate(prior_rate=0.6, prior_weight=2.0, decay=0.5)
    e.observe(offered=8, drafted_depth=8, accepted=0)  # one rejection: rate (0 + 1.2) / (1 + 2) = 0.4
    assert e.rate == pytest.approx(0.4)
    for _ in range(40):  # steps offered nothing only decay the evidence
        e.observe(offered=0, drafted_depth=0, accepted=0)
    assert e.rate == pytest.approx(0.6, abs=1e-6) and e.proposal_rate == pytest.approx(0.5, abs=1e-6)


def test_expected_accepted_is_a_geometric_sum():
    e = estimate_with(0.5)
    # 0.5 + 0.25 + 0.125 = 0.875
    assert e.expected_accepted(3) == pytest.approx(0.875, abs=1e-3)
    assert e.expected_accepted(0) == 0.0
    # a drafter that proposes on a quarter of the steps yields a quarter of that
    assert estimate_with(0.5, proposal=0.25).expected_accepted(3) == pytest.approx(0.875 / 4, abs=1e-3)


def test_step_cost_interpolates_and_extrapolates():
    cost = StepCost({1: 1.0, 9: 2.0})
    assert cost.estimate(5) == pytest.approx(1.5)  # halfway between 1 and 9
    assert cost.estimate(18) == pytest.approx(4.0)  # beyond the last point: proportional, 2.0 * 18 / 9
    cost.observe(5, 2.5)  # weight 0.1: 0.9 * 1.5 + 0.1 * 2.5 = 1.6
    assert cost.estimate(5) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="rows >= 1"):
        StepCost({0: 1.0})


def test_flat_cost_drafts_as_far_as_allowed():
    # when a wider step costs nothing more, any expected acceptance is a gain: draft the most allowed
    flat = StepCost({1: 1.0, 10_000: 1.0})
    assert choose_draft_length([estimate_with(0.3)], [32], 1, flat, max_draft=16) == 16
    assert choose_draft_length([estimate_with(0.3)], [5], 1, flat, max_draft=16) == 5  # the cap binds


def test_proportional_cost_never_speculates():
    # cost proportional to rows: k draft tokens cost k rows each, and fewer than k are expected accepted on
    # average, so speculation can only lose; the policy must fall back to plain decoding
    linear = StepCost({1: 1.0})
    assert choose_draft_length([estimate_with(0.95)] * 4, [32] * 4, 4, linear, max_draft=32) == 0


def test_larger_batch_drafts_less():
    # memory-bound up to 16 rows, then linear: one sequence can draft 15 for free, sixteen cannot draft any for free
    cost = StepCost({1: 1.0, 16: 1.0, 1024: 64.0})
    one = choose_draft_length([estimate_with(0.8)], [32], 1, cost, max_draft=32)
    many = choose_draft_length([estimate_with(0.8)] * 16, [32] * 16, 16, cost, max_draft=32)
    assert one >= 8 and many < one
    bad = choose_draft_length([estimate_with(0.05)] * 16, [32] * 16, 16, cost, max_draft=32)
    assert bad == 0  # poor acceptance under load: plain decoding
    silent = choose_draft_length([estimate_with(0.8, proposal=0.02)] * 16, [32] * 16, 16, cost, max_draft=32)
    assert silent == 0  # drafters that almost never propose: widening the step would not pay


def test_fixed_lengths_widen_the_step_for_free():
    # a reproducible sequence already drafts 6, so the step has 7 rows anyway: the others may draft up to 6 free
    cost = StepCost({1: 1.0, 14: 1.0, 1024: 73.0})
    fixed = [(estimate_with(0.5), 6)]
    assert choose_draft_length([estimate_with(0.5)], [32], 2, cost, max_draft=32, fixed=fixed) >= 6


def test_unpadded_runner_prices_each_sequence_by_its_own_rows():
    # 16 sequences, 15 of them at their last token (cap 0); steps are free up to 64 rows. Padded, a k-token draft
    # costs 16 x (1 + k) rows, so 3 fit; without padding (the fast batch runner) it costs 16 + k: draft the cap
    cost = StepCost({1: 1.0, 64: 1.0, 1024: 16.0})
    estimates, caps = [estimate_with(0.8)] * 16, [32] + [0] * 15
    assert choose_draft_length(estimates, caps, 16, cost, max_draft=32) == 3
    assert choose_draft_length(estimates, caps, 16, cost, max_draft=32, padded=False) == 32
    # a fixed 6-token draft widens a padded step for everybody (free up to 6), an unpadded one only for itself
    fixed, steep = [(estimate_with(0.5), 6)], StepCost({1: 1.0, 2: 2.0})
    assert choose_draft_length([estimate_with(0.5)], [32], 2, steep, max_draft=32, fixed=fixed) == 6
    assert choose_draft_length([estimate_with(0.5)], [32], 2, steep, max_draft=32, fixed=fixed, padded=False) < 6


def test_own_draft_length_ignores_the_batch():
    e = estimate_with(0.9)
    assert own_draft_length(e, cap=32, max_draft=32) == own_draft_length(e, cap=32, max_draft=32) > 0
    assert own_draft_length(e, cap=2, max_draft=32) == 2
    assert own_draft_length(estimate_with(0.01), cap=32, max_draft=32) == 0


def test_step_cost_learns_what_one_sequence_pays_beyond_the_curve():
    cost = StepCost({1: 1.0, 4: 2.0, 16: 0.5}, weight=0.5)  # a noisy calibration: 16 rows cannot cost less than 4
    assert cost.points == {1: 1.0, 4: 2.0, 16: 2.0}
    cost.observe(4, 3.0)  # one sequence, 1 s slower than the curve: half of that is learned
    assert cost.offset == pytest.approx(0.5) and cost.points == {1: 1.0, 4: 2.0, 16: 2.0}
    assert cost.estimate(1) == pytest.approx(1.5) and cost.estimate(16) == pytest.approx(2.5)  # every size alike
    cost.observe(1, 2.0)
    assert cost.offset == pytest.approx(0.75)
    assert cost.estimate(4, sequences=2) == cost.curve(4)  # several sequences: the offset does not apply
    cost.observe(4, 0.1)  # far faster than calibrated: the price stays positive
    assert cost.estimate(1) >= 0.25
    frozen = StepCost({1: 1.0, 8: 3.0}, weight=0.0)
    frozen.observe(8, 100.0)
    assert frozen.estimate(8) == 3.0


def test_step_cost_prices_further_sequences():
    cost = StepCost({1: 1.0, 9: 2.0}, weight=0.5, per_sequence=0.25)
    assert cost.estimate(4, sequences=4) == pytest.approx(1.375 + 3 * 0.25)  # curve at 4 rows + 3 more sequences
    assert cost.estimate(4) == cost.curve(4) == pytest.approx(1.375)
    cost.observe(9, 6.0, sequences=5)  # several sequences: the curve and per_sequence stay as calibrated
    assert cost.per_sequence == 0.25 and cost.points[9] == 2.0
    cost.observe(9, 3.0)  # one sequence: half of its 1 s beyond the curve goes into the offset
    assert cost.offset == pytest.approx(0.5) and cost.points[9] == 2.0 and cost.per_sequence == 0.25
    with pytest.raises(ValueError, match="per_sequence"):
        StepCost({1: 1.0}, per_sequence=-1.0)


def test_step_cost_learns_the_load_and_the_price_of_rows():
    # steps of 8-16 sequences run 1.3x slower than calibrated, and their drafted rows 1.8x dearer, with 10 % noise
    rng = random.Random(0)

    def run(cost: StepCost, drafted_share: float) -> StepCost:
        for _ in range(400):
            sequences = rng.randint(8, 16)
            rows = sequences + (rng.randint(1, 16) if rng.random() < drafted_share else 0)
            plain, extra = cost.calibrated(rows, sequences)
            cost.observe(rows, (1.3 * plain + 1.8 * extra) * rng.uniform(0.9, 1.1), sequences)
        return cost

    def fresh() -> StepCost:
        return StepCost({1: 1.0, 16: 1.5, 64: 4.0}, per_sequence=0.1)

    cost = run(fresh(), 0.5)
    assert cost.load == pytest.approx(1.3, abs=0.05) and cost.row_load == pytest.approx(1.8, abs=0.25)
    plain, extra = cost.calibrated(24, 16)
    assert extra > 0 and cost.estimate(24, 16) == pytest.approx(cost.load * plain + cost.row_load * extra)
    assert cost.estimate(24) == cost.curve(24)  # one sequence: the curve as it is
    # the dearer rows buy fewer of them: the same chances, fewer rows than the calibrated model hands out
    gains = [[0.6, 0.4, 0.25, 0.1] for _ in range(16)]
    assert sum(choose_draft_lengths(gains, cost)) < sum(choose_draft_lengths(gains, fresh()))
    only_plain = run(fresh(), 0.0)  # nothing says what a row costs: its factor stays at the prior
    assert only_plain.load == pytest.approx(1.3, abs=0.05) and only_plain.row_load == 1.0
    frozen = StepCost({1: 1.0, 16: 1.5}, weight=0.0)  # weight 0 learns nothing
    frozen.observe(20, 100.0, sequences=16)
    assert frozen.load == frozen.row_load == 1.0


def test_rows_go_to_the_sequences_likeliest_to_gain():
    # a row costs 0.1 of a step's base (1 + 3 sequences x 1 = 4 plus 0.1 per row beyond 4): a node pays when its
    # chance beats (tokens per second now) x 0.1, about 0.1 x 4 / 4 = 0.1 at first
    cost = StepCost({1: 1.0, 4: 1.0, 1 << 20: 1.0 + 0.1 * ((1 << 20) - 4)}, per_sequence=1.0)
    gains = [[0.9, 0.8, 0.7, 0.05], [0.02, 0.01], [0.5, 0.3, 0.2, 0.15, 0.12], []]
    lengths = choose_draft_lengths(gains, cost)
    assert lengths[0] >= 3 and lengths[1] == 0 and lengths[3] == 0 and 1 <= lengths[2] <= 5
    assert lengths[0] < 4  # 0.05 does not pay
    flat = StepCost({1: 1.0, 1 << 20: 1.0})
    assert choose_draft_lengths(gains, flat) == [4, 2, 5, 0]  # free rows: every node with a chance
    assert choose_draft_lengths([[0.0, 0.0]], flat) == [0]  # no chance, no row (ties go to fewer rows)
    steep = StepCost({1: 1.0, 2: 50.0})
    assert choose_draft_lengths(gains, steep) == [0, 0, 0, 0]  # any row is ruinous: plain decoding


def test_rows_per_sequence_match_the_common_length_for_one_sequence():
    # one sequence: the greedy order is depth order, so the rule agrees with choose_draft_length
    cost = StepCost({1: 1.0, 8: 1.14, 64: 8.0})
    for rate in (0.1, 0.5, 0.8, 0.95):
        e = estimate_with(rate)
        assert choose_draft_lengths([e.gains(32)], cost) == [choose_draft_length([e], [32], 1, cost, 32,
                                                                                   padded=False)]


def test_fixed_sequences_count_in_the_step():
    # a reproducible sequence with a 6-node draft: its rows are in the step whatever the others do
    cost = StepCost({1: 1.0, 8: 1.0, 9: 3.0})  # free up to 8 rows, ruinous beyond
    assert choose_draft_lengths([[0.5] * 8], cost) == [7]  # alone: 8 rows are free
    assert choose_draft_lengths([[0.5] * 8], cost, fixed=[(estimate_with(0.5), 6)]) == [0]  # 8 rows are used


def test_drafter_calibration_scales_towards_the_outcome():
    cal = DrafterCalibration(decay=1.0, prior=5.0)
    assert cal.factor == 1.0  # no evidence: the drafter is taken at its word
    cal.observe(predicted=10.0, accepted=5)  # (5 + 5) / (10 + 5)
    assert cal.factor == pytest.approx(10 / 15)
    for _ in range(100):
        cal.observe(predicted=10.0, accepted=0)
    assert cal.factor == cal.low  # never below the floor: estimates stay usable
    for _ in range(1000):
        cal.observe(predicted=0.1, accepted=3)
    assert cal.factor == cal.high


def test_step_cost_prices_many_row_counts_at_once():
    # choose_draft_lengths prices every prefix of its candidates in one call: the same numbers as one at a time
    cost = StepCost({1: 1.0, 5: 1.25, 40: 3.0}, per_sequence=0.05)
    cost.load, cost.row_load, cost.offset = 1.2, 1.7, 0.01
    for sequences in (1, 2, 16):
        rows = np.arange(1, 120)
        assert cost.estimates(rows, sequences) == pytest.approx([cost.estimate(int(n), sequences) for n in rows],
                                                                rel=1e-12)


def test_a_drafter_that_does_not_pay_for_itself_rests():
    upkeep = DrafterUpkeep(patience=2, rest_steps=3)
    upkeep.judge(False)
    upkeep.judge(True)  # a step that pays starts the count again
    upkeep.judge(False)
    assert not upkeep.rest()
    upkeep.judge(False)  # two in a row: three steps off, then judged again
    assert [upkeep.rest() for _ in range(4)] == [True, True, True, False]
    upkeep.observe(2.0)
    upkeep.observe(1.0)
    assert upkeep.seconds == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)


def test_the_row_plan_prices_the_step_with_and_without_drafts():
    cost = StepCost({1: 1.0, 4: 1.0, 1 << 20: 1.0 + 0.1 * ((1 << 20) - 4)}, per_sequence=1.0)
    plan = plan_draft_lengths([[0.9, 0.8], [0.05]], cost)
    assert plan.lengths == [2, 0]
    assert plan.plain_tokens == 2 and plan.plain_seconds == cost.estimate(2, 2)
    assert plan.tokens == pytest.approx(2 + 0.9 + 0.8) and plan.seconds == pytest.approx(cost.estimate(4, 2))
