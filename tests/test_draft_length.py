"""The hardware-aware chain length (draft_length.ChainLength) and the chain drafters that use it (pld; copy with
adaptive=True): the choice on literal curves, greedy equivalence and sampling exactness with it switched on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from leapdecode.budget import LatencyCurve
from leapdecode.decode import GenerationConfig, speculate
from leapdecode.draft_length import ChainLength
from leapdecode.drafters.copy import CopyDrafter
from leapdecode.drafters.pld import PromptLookup
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.sampling import SamplingConfig, warp
from leapdecode.stats import Stats
from stats_util import empirical_law, marginal, tv_bound, tv_distance

SIZES = (0, 1, 2, 4, 8, 16, 32, 64)
FLAT = LatencyCurve(SIZES, (0.010,) * len(SIZES))  # extra rows are free: a memory-bound step
STEEP = LatencyCurve(SIZES, tuple(0.010 * (1 + n) for n in SIZES))  # every row costs a whole step


def test_flat_curve_offers_the_whole_budget_and_steep_offers_nothing():
    assert ChainLength(FLAT).limit(10) == 10  # free rows: any acceptance at all pays
    assert ChainLength(STEEP).limit(10) == 0  # a row costs a step: no rate below 1 can pay for it
    assert ChainLength(FLAT).limit(0) == 0


def test_length_follows_acceptance_on_a_moderate_curve():
    moderate = LatencyCurve(SIZES, tuple(0.010 * (1 + 0.2 * n) for n in SIZES))  # +20 % of a step per row
    good, bad = ChainLength(moderate), ChainLength(moderate)
    good_offers, bad_offers = [], []
    for _ in range(60):
        good_offers.append(good.limit(16))
        good.observe(drafted=good.offered, accepted=good.offered)  # everything accepted
        bad_offers.append(bad.limit(16))
        bad.observe(drafted=bad.offered, accepted=0)  # nothing accepted
    assert min(good_offers[10:]) >= 4
    # nothing accepted: mostly plain steps, but the evidence decays while nothing is offered, so it probes again
    assert sum(1 for k in bad_offers[10:] if k) <= 25 and max(bad_offers[10:]) == 1
    bad.reset()
    assert bad.limit(16) == ChainLength(moderate).limit(16)


def test_pld_offers_no_draft_when_the_curve_says_it_cannot_pay():
    context = [5, 6, 7, 8, 5, 6, 7]  # "5 6 7" repeats: plain pld proposes 8 5 6 7 ...
    assert PromptLookup(num_draft_tokens=4, adaptive=False, latency_curve=STEEP).propose(context, 16).n == 4
    assert PromptLookup(num_draft_tokens=4, latency_curve=FLAT).propose(context, 16).n == 4
    assert PromptLookup(num_draft_tokens=4, latency_curve=STEEP).propose(context, 16).n == 0
    assert CopyDrafter(gamma=2, min_draft=4, adaptive=True, latency_curve=STEEP).propose(context, 16).n == 0
    assert CopyDrafter(gamma=2, min_draft=4, latency_curve=STEEP).propose(context, 16).n == 4  # copy: off by default


def adaptive_drafters(curve: LatencyCurve):
    yield "pld", PromptLookup(num_draft_tokens=6, latency_curve=curve)
    yield "copy", CopyDrafter(gamma=1, min_draft=2, max_draft=8, adaptive=True, latency_curve=curve)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_greedy_equivalence_with_adaptive_chain_length(arch):
    model = tiny_model(arch, vocab_size=64, seed=0)
    runner = HFRunner(model.hf_model)
    config = GenerationConfig(max_new_tokens=40)
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [7, 8, 9, 7, 8, 9], list(range(10, 30)) * 2]
    moderate = LatencyCurve(SIZES, tuple(0.010 * (1 + 0.05 * n) for n in SIZES))
    for prompt in prompts:
        plain = [t for step in speculate(runner, prompt, None, config) for t in step]
        for curve in (FLAT, moderate, STEEP):
            for name, drafter in adaptive_drafters(curve):
                stats = Stats()
                out = [t for step in speculate(runner, prompt, drafter, config, stats=stats) for t in step]
                assert out == plain, (arch, name, curve.seconds[:3])
                if curve is STEEP:
                    assert stats.draft_tokens == 0, name  # nothing was worth verifying


# --- sampling exactness: the chain length depends on earlier acceptances only, so each step stays an exact
# rejection step; the samples must follow the target's law ---------------------------------------------------

VOCAB, LENGTH, RUNS = 8, 3, 600
PROMPT = [3, 5, 3, 5, 3, 5, 3]  # repetitive: pld and copy propose from the first step on


def model_law(hf_model, sampling: SamplingConfig) -> np.ndarray:
    """Exact law [VOCAB^3] of the first 3 new tokens after PROMPT (enumerated with one batched forward)."""
    seqs = list(itertools.product(range(VOCAB), repeat=2))
    ids = torch.tensor([PROMPT + list(s) for s in seqs])  # [V^2, P + 2]
    with torch.inference_mode():
        p = warp(hf_model(input_ids=ids).logits[:, -3:], sampling).double()  # [V^2, 3, V]
    p1, p2, p3 = p[0, 0], p[::VOCAB, 1], p[:, 2].reshape(VOCAB, VOCAB, VOCAB)
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1).numpy()


@pytest.mark.parametrize("name", ["pld", "copy"])
def test_sampled_outputs_follow_the_target_law(name):
    target = tiny_model("llama", vocab_size=VOCAB, seed=1, num_hidden_layers=1, initializer_range=0.35)
    runner = HFRunner(target.hf_model)
    sampling = SamplingConfig(temperature=1.0)
    drafter = dict(adaptive_drafters(FLAT))[name]  # flat: it drafts whenever it can, so drafts are verified
    samples, drafted, accepted = np.empty((RUNS, LENGTH), dtype=np.int64), 0, 0
    for run in range(RUNS):
        config = GenerationConfig(max_new_tokens=LENGTH + 1, sampling=SamplingConfig(temperature=1.0, seed=run),
                                  ignore_eos=True)
        stats = Stats()
        samples[run] = [t for step in speculate(runner, PROMPT, drafter, config, stats=stats) for t in step][:LENGTH]
        drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens
    assert drafted > RUNS and 0 < accepted < drafted  # drafts were verified, some kept and some rejected
    exact, empirical = model_law(target.hf_model, sampling), empirical_law(samples, VOCAB)
    for keep in [(0,), (1,), (2,), (0, 1), (0, 1, 2)]:
        emp, ex = (marginal(law, VOCAB, LENGTH, keep) for law in (empirical, exact))
        assert tv_distance(emp, ex) <= tv_bound(ex, RUNS), (keep, tv_distance(emp, ex), tv_bound(ex, RUNS))


def test_a_latency_curve_given_as_text_is_a_clear_error():
    from leapdecode.drafters.registry import make_drafter

    for name in ("pld", "copy"):
        with pytest.raises(ValueError, match="option 'latency_curve' takes a measured"):
            make_drafter(name, {"latency_curve": "fast"})
