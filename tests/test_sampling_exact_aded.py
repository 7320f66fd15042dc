"""Sampling exactness end to end for the ADED drafter: its deterministic trees, verified by the decode loop at
temperature 1 (and with top-k/top-p), give samples whose first 3 tokens follow the target's exact law.

The target is a tiny random-weight Llama over 12 tokens; the exact law of the first 3 tokens after the prompt is
enumerated with one batched forward pass over every (x1, x2). One ADED object serves every run and learns from
the target as it goes, so later runs draft well (checked: MAT well above 1). Its drafts depend on earlier runs,
never on the current run's random draws, so each run is still an independent sample of the target's law.
Bounds from stats_util: a correct sampler exceeds them with probability below 1e-6.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from leapdecode.decode import GenerationConfig, speculate
from leapdecode.drafters.aded import ADED
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.sampling import SamplingConfig, warp
from leapdecode.stats import Stats
from stats_util import empirical_law, marginal, tv_bound, tv_distance

VOCAB = 12
LENGTH = 3  # compared tokens per run
RUNS = {"t1": 800, "topk_topp": 400}  # runs per sampling config (~15 ms each on one core)
PROMPT = [3]
CONFIGS = {"t1": SamplingConfig(temperature=1.0), "topk_topp": SamplingConfig(temperature=1.2, top_k=5, top_p=0.9)}
MARGINALS = [(0,), (1,), (2,), (0, 1), (0, 1, 2)]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny forwards: see conftest.one_thread


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab_size=VOCAB, seed=1, num_hidden_layers=1, initializer_range=0.35)


def exact_law(hf_model, sampling: SamplingConfig) -> np.ndarray:
    """Law [VOCAB^3] of the first 3 tokens: row x1 * V + x2 of the batch is PROMPT + (x1, x2), whose last three
    positions give the warped p(x1), p(x2 | x1) and p(x3 | x1, x2)."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [V^2, 2]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], dim=1)  # [V^2, 3]
    with torch.inference_mode():
        p = warp(hf_model(input_ids=ids).logits[:, -3:], sampling).double()  # [V^2, 3, V]
    p1 = p[0, 0]  # [V]
    p2 = p[::VOCAB, 1]  # [x1, x2]
    p3 = p[:, 2].reshape(VOCAB, VOCAB, VOCAB)  # [x1, x2, x3]
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1).numpy()


def aded_samples(target, sampling: SamplingConfig, seed0: int, runs: int) -> tuple[np.ndarray, float, list[int]]:
    """`runs` samples [runs, 3], the MAT over all runs, and each run's first drafted token (-1 if none)."""
    runner = HFRunner(target.hf_model)
    drafter = ADED(seed=5)
    first_drafted: list[int] = []
    propose = drafter.propose

    def recording_propose(context, budget):  # remember what the drafter guessed first in each run
        draft = propose(context, budget)
        if len(context) == len(PROMPT):
            first_drafted.append(int(draft.tokens[0]) if draft.n else -1)
        return draft

    drafter.propose = recording_propose
    out = np.empty((runs, LENGTH), dtype=np.int64)
    steps = emitted = 0
    for run in range(runs):
        # 5 new tokens so that the first step may verify a 4-node tree; the first 3 are compared
        config = GenerationConfig(max_new_tokens=5, ignore_eos=True,
                                  sampling=dataclasses.replace(sampling, seed=seed0 + run))
        stats = Stats()
        new = [t for step in speculate(runner, PROMPT, drafter, config, stats=stats) for t in step]
        out[run] = new[:LENGTH]
        steps += stats.steps
        emitted += len(new)
    return out, emitted / steps, first_drafted


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_aded_samples_follow_the_exact_law(target, config_name):
    exact = exact_law(target.hf_model, CONFIGS[config_name])
    assert abs(exact.sum() - 1.0) < 1e-6 and (exact > 0.01).sum() >= 10  # a spread law: real choices to get wrong
    runs = RUNS[config_name]
    samples, mat, first_drafted = aded_samples(target, CONFIGS[config_name], 10_000 * len(config_name), runs)
    # drafts are accepted often (speculation is under test, not plain sampling); 5 tokens take >= 2 steps
    assert mat > 1.4, mat
    empirical = empirical_law(samples, VOCAB)
    for keep in MARGINALS:
        emp, ex = (marginal(law, VOCAB, LENGTH, keep) for law in (empirical, exact))
        assert tv_distance(emp, ex) <= tv_bound(ex, runs), (keep, tv_distance(emp, ex), tv_bound(ex, runs))
    # sensitivity: emitting the drafter's own first guess instead of verifying it would miss the first-token law
    # by more than twice the bound, so a loop that trusted the drafts would fail the check above
    guesses = np.bincount([t for t in first_drafted if t >= 0], minlength=VOCAB) / max(1, sum(t >= 0 for t in
                                                                                             first_drafted))
    first = marginal(exact, VOCAB, LENGTH, (0,))
    assert tv_distance(guesses, first) > 2 * tv_bound(first, runs)
