"""Sampling exactness of the Lookahead drafter, end to end through the decode loop.

A tiny random-weight Llama (vocabulary 8) samples at temperature 1 through `speculate` with the Lookahead drafter:
trees of distinct siblings from the n-gram pool (seeded by the prompt, so the first steps already branch) and the
Jacobi window riding along in the same pass. The law of the first 3 new tokens must be the target's own joint law
p(x1) p(x2 | x1) p(x3 | x1 x2), enumerated exactly from the model (8^3 = 512 sequences). The distance is total
variation and the threshold is the rigorous finite-sample bound of stats_util (a correct sampler exceeds it with
probability below 1e-6). A control shows the check has power: the same samples are far from the law at another
temperature.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leapdecode import GenerationConfig, SamplingConfig, speculate
from leapdecode.drafters.lookahead import Lookahead
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.stats import Stats
from stats_util import empirical_law, exact_sequence_law, tv_bound, tv_distance

VOCAB = 8
LENGTH = 3  # tokens of each sample whose joint law is checked
NEW_TOKENS = LENGTH + 1  # one more, so the first step's budget (remaining - 1 = 3 nodes) fits a branching tree
SAMPLES = 1000
# The model's own sampled output after [6, 6, 0]: it contains n-grams this random model tends to repeat, so the
# prompt-seeded pool drafts tokens that are accepted often (the root is 5)
PROMPT = [6, 6, 0, 4, 4, 1, 5, 5, 7, 5, 2, 1, 1, 0, 3, 1, 5]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny forwards: see conftest.one_thread


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, seed=0)


@torch.inference_mode()
def exact_law(model, temperature: float) -> np.ndarray:
    """Law [VOCAB**LENGTH] of the first LENGTH tokens after PROMPT, from batched plain forwards over every prefix."""
    laws: dict[tuple[int, ...], np.ndarray] = {}
    prefixes: list[tuple[int, ...]] = [()]
    for _ in range(LENGTH):
        ids = torch.tensor([PROMPT + list(prefix) for prefix in prefixes])  # [batch, len]
        logits = model.hf_model(input_ids=ids).logits[:, -1].double()  # [batch, vocab]
        probs = (logits / temperature).softmax(-1).numpy()
        laws.update(zip(prefixes, probs))
        prefixes = [prefix + (t,) for prefix in prefixes for t in range(VOCAB)]
    return exact_sequence_law(lambda prefix: laws[prefix], VOCAB, LENGTH)


def test_first_draft_is_a_branching_tree():
    # 3-grams of the prompt keyed by the root 5, most recent first: (5 2 1), (5 7 5), (5 5 7); merged into a trie
    # they are three root children; with the first step's budget of 3 the tree is 2 -> 1 and a second root child 7
    drafter = Lookahead(window=3, ngram=3)
    drafter.reset(PROMPT)
    draft = drafter.propose(PROMPT, NEW_TOKENS - 1)
    assert draft.tokens.tolist() == [2, 1, 7] and draft.parents.tolist() == [-1, 0, -1]


def test_lookahead_samples_follow_the_target_law(model):
    runner = HFRunner(model.hf_model)
    drafter = Lookahead(window=3, ngram=3)
    samples = np.empty((SAMPLES, LENGTH), dtype=np.int64)
    accepted = steps = 0
    for s in range(SAMPLES):
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                  sampling=SamplingConfig(temperature=1.0, seed=s))
        stats = Stats()
        samples[s] = [t for step in speculate(runner, PROMPT, drafter, config, stats=stats) for t in step][:LENGTH]
        accepted, steps = accepted + stats.accepted_tokens, steps + stats.steps
    # drafted tokens must be accepted often, so the law is made by acceptance and correction, not only by plain
    # sampling of the bonus
    assert accepted / steps > 0.3, (accepted, steps)
    exact = exact_law(model, 1.0)
    tv = tv_distance(empirical_law(samples, VOCAB), exact)
    assert tv <= tv_bound(exact, SAMPLES), (tv, tv_bound(exact, SAMPLES))
    # control: the law at temperature 0.5 is a different target; the same samples must fail against it
    other = exact_law(model, 0.5)
    assert tv_distance(empirical_law(samples, VOCAB), other) > tv_bound(other, SAMPLES)
