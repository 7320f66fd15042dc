"""Sampling exactness of the Token Recycling and hybrid drafters, end to end through the decode loop.

Both propose deterministic trees (q None) whose siblings are distinct, built from what the target said in earlier
steps (and, for the hybrid, from copies of the context). On a tiny random Llama (vocabulary 12) at temperature 1
the first three new tokens of many seeded runs must follow the target's exact law, enumerated by one batched
forward pass over every continuation. The drafter object is shared by all runs, so its table warms up and later
runs accept several tokens per step: the exact rule is exercised on real trees, not only on empty drafts.
The bounds are stats_util's rigorous finite-sample bounds (false alarm < 1e-6 per check). That such checks do
fail on wrong acceptance rules for deterministic trees is shown in test_sampling_exact.py; with 600 runs the bound
on a single token's marginal is about 0.16 in total variation (0.4 on the joint law of all three).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leapdecode.decode import GenerationConfig, speculate
from leapdecode.drafters.hybrid import Hybrid
from leapdecode.drafters.recycling import TokenRecycling, best_first_template
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.sampling import SamplingConfig, warp
from leapdecode.stats import Stats
from stats_util import empirical_law, marginal, tv_bound, tv_distance

VOCAB = 12
LENGTH = 3  # new tokens compared per run (joint support 12^3)
RUNS = 600
PROMPT = [3, 5, 3]  # "3" occurs twice, so the hybrid's prompt lookup finds a match (chain 5 3 5 ...)
MARGINALS = [(0,), (1,), (2,), (0, 1), (0, 1, 2)]
SHAPE = dict(num_hidden_layers=1, initializer_range=0.35)  # one cheap layer; laws neither flat nor one-hot


def exact_law(hf_model, sampling: SamplingConfig) -> np.ndarray:
    """[VOCAB^3] law of the first 3 new tokens: row k of the batch is PROMPT + (x1, x2), k = x1 * V + x2; its last
    three positions give p(x1), p(x2 | x1), p(x3 | x1 x2) (warped)."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [V^2, 2] lexicographic
    ids = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], dim=1)  # [V^2, P + 2]
    with torch.inference_mode():
        p = warp(hf_model(input_ids=ids).logits[:, -3:], sampling).double()  # [V^2, 3, V]
    p1 = p[0, 0]  # [V] the same in every row
    p2 = p[::VOCAB, 1]  # [x1, x2]: rows with x2 = 0 hold p(. | x1) at position -2
    p3 = p[:, 2].reshape(VOCAB, VOCAB, VOCAB)  # [x1, x2, x3]
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1).numpy()


@pytest.fixture(scope="module")
def target():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny passes: a second thread only adds overhead
    yield tiny_model("llama", vocab_size=VOCAB, seed=1, **SHAPE)
    torch.set_num_threads(threads)


def sample_runs(target, drafter) -> tuple[np.ndarray, float]:
    """[RUNS, 3] first new tokens of independent seeded runs (5 new tokens each, so steps can verify several
    nodes), and the MAT over all runs."""
    runner = HFRunner(target.hf_model)
    out = np.empty((RUNS, LENGTH), dtype=np.int64)
    steps = emitted = 0
    for run in range(RUNS):
        config = GenerationConfig(max_new_tokens=5, sampling=SamplingConfig(temperature=1.0, seed=1000 + run),
                                  ignore_eos=True)
        stats = Stats()
        new = [t for step in speculate(runner, PROMPT, drafter, config, stats=stats) for t in step]
        out[run] = new[:LENGTH]
        steps += stats.steps
        emitted += len(new)
    return out, emitted / steps


DRAFTERS = {
    "recycling": lambda: TokenRecycling(top_k=4, template=best_first_template((0.5, 0.25, 0.15, 0.1), 12, 4)),
    "hybrid": lambda: Hybrid(top_k=4, template=best_first_template((0.5, 0.25, 0.15, 0.1), 12, 4), max_chain=4),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_samples_follow_the_exact_law(target, name):
    samples, mat = sample_runs(target, DRAFTERS[name]())
    assert mat > 1.3, mat  # trees are accepted often: speculation is under test, not plain sampling
    exact = exact_law(target.hf_model, SamplingConfig(temperature=1.0))
    empirical = empirical_law(samples, VOCAB)
    for keep in MARGINALS:
        emp, ex = (marginal(law, VOCAB, LENGTH, keep) for law in (empirical, exact))
        assert tv_distance(emp, ex) <= tv_bound(ex, RUNS), (keep, tv_distance(emp, ex), tv_bound(ex, RUNS))
