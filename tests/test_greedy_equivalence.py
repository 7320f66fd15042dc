"""Greedy equivalence: every drafter's output is token-for-token the target's plain greedy output.

Three tiny random-weight architectures in float32 (Llama, Qwen2, Gemma 3 with sliding-window layers) and the real
SmolLM2-135M-Instruct. Test drafters pin down the extremes: random (nothing accepted), the target drafting for
itself (everything accepted), and scripted oracles right for exactly j tokens. Every drafter in the registry is
covered automatically, so a new drafter cannot land without passing this.
"""

from __future__ import annotations

import pytest
import torch

from leapdecode import GenerationConfig, speculate
from leapdecode.drafters.draft_model import DraftModel
from leapdecode.drafters.registry import make_drafter, names
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from scripted_drafters import OracleDrafter, OracleTreeDrafter, RandomDrafter

ARCHS = ["llama", "qwen2", "gemma3"]
VOCAB = 64
NEW_TOKENS = 40
# prompts with repeats so the n-gram drafters find matches, and one without
PROMPTS = [[3, 9, 12, 5, 3, 9, 12, 5, 3, 9], [7, 1, 22, 40, 41, 42, 17, 7, 1, 22, 40], [11, 60, 2, 33, 18, 5, 27]]


def run(runner, prompt, drafter, new_tokens=NEW_TOKENS, budget=64) -> tuple[list[int], object]:
    from leapdecode.stats import Stats

    stats = Stats()
    config = GenerationConfig(max_new_tokens=new_tokens, budget=budget, ignore_eos=True)
    out = [t for step in speculate(runner, prompt, drafter, config, stats=stats) for t in step]
    return out, stats


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    """A tiny target, its runner and its plain greedy outputs for PROMPTS."""
    model = tiny_model(request.param, vocab_size=VOCAB, seed=1)
    runner = HFRunner(model.hf_model)
    plain = [run(runner, p, None)[0] for p in PROMPTS]
    return request.param, model, runner, plain


def test_plain_loop_matches_transformers_generate(arch_case):
    # the loop with an empty draft must be plain greedy decoding: compare with transformers' own generate
    _, model, _, plain = arch_case
    for prompt, expected in zip(PROMPTS, plain):
        out = model.hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == expected


def test_outputs_are_not_degenerate(arch_case):
    # equivalence on a constant output would prove little: the tiny models must produce varied tokens
    _, _, _, plain = arch_case
    assert all(len(set(out)) >= 5 for out in plain)


def scripted_cases(reference):
    yield "random", RandomDrafter(reference, VOCAB), None
    for right in (0, 1, 3):
        # a chain right for exactly `right` tokens: each step accepts exactly min(right, upcoming) of them
        yield f"oracle-{right}", OracleDrafter(reference, VOCAB, right=right), right
    yield "oracle-tree", OracleTreeDrafter(reference, VOCAB), None


def test_scripted_drafters(arch_case):
    _, _, runner, plain = arch_case
    for prompt, expected in zip(PROMPTS, plain):
        for label, drafter, right in scripted_cases(prompt + expected):
            out, stats = run(runner, prompt, drafter)
            assert out == expected, label
            if right is not None:
                # every step but possibly the last (budget-trimmed) accepts exactly `right` tokens
                assert stats.accepted_tokens >= right * (stats.steps - 1), label
                assert stats.accepted_tokens <= right * stats.steps, label
            if label == "random":
                assert stats.mat < 1.5  # a random guess over 64 tokens is almost never right


def test_target_as_its_own_drafter_accepts_everything(arch_case):
    # the target drafting for itself proposes exactly its greedy continuation: all 5 drafted tokens are accepted
    _, model, runner, plain = arch_case
    for prompt, expected in zip(PROMPTS, plain):
        out, stats = run(runner, prompt, DraftModel(model.hf_model, num_draft_tokens=5))
        assert out == expected
        assert stats.accepted_tokens == stats.draft_tokens
        assert stats.mat > 5.5  # 6 tokens (5 + bonus) per step except the budget-trimmed last one


@pytest.mark.parametrize("name", [n for n in names() if n != "draft-model"])
def test_registry_drafters(arch_case, name):
    _, _, runner, plain = arch_case
    for prompt, expected in zip(PROMPTS, plain):
        for budget in (64, 3):  # a small budget forces drafters to trim their proposals
            out, _ = run(runner, prompt, make_drafter(name), budget=budget)
            assert out == expected, (name, budget)


def test_draft_model_with_another_model(arch_case):
    # a different random model drafts: few tokens accepted, output still identical
    _, _, runner, plain = arch_case
    other = tiny_model("llama", vocab_size=VOCAB, seed=7)
    for prompt, expected in zip(PROMPTS, plain):
        out, _ = run(runner, prompt, DraftModel(other.hf_model, num_draft_tokens=4))
        assert out == expected


# --- the real SmolLM2-135M-Instruct ---------------------------------------------------------------------------

CHAT_PROMPTS = [
    "Summarize the following text in two sentences.\n\nThe city council met on Tuesday to discuss the new park. "
    "The park will have a playground, a pond and a small library. Council members said the park will open next "
    "spring. Residents asked for more trees and benches, and the council agreed to add both to the plan.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "What is the capital of Japan? Answer in one sentence.",
    "List three tips for staying focused while studying.",
]


@pytest.fixture(scope="module")
def smollm2_plain(smollm2):
    runner = HFRunner(smollm2.hf_model)
    prompts = [smollm2.encode(p) for p in CHAT_PROMPTS]
    return runner, prompts, [run(runner, p, None, new_tokens=48)[0] for p in prompts]


@pytest.mark.real
@pytest.mark.parametrize("name", ["pld", "copy", "random", "oracle-2", "oracle-tree"])
def test_real_model_greedy_equivalence(smollm2_plain, smollm2, name):
    runner, prompts, plain = smollm2_plain
    vocab = smollm2.vocab_size
    for prompt, expected in zip(prompts, plain):
        reference = prompt + expected
        drafter = {"random": lambda: RandomDrafter(reference, vocab),
                   "oracle-2": lambda: OracleDrafter(reference, vocab, right=2),
                   "oracle-tree": lambda: OracleTreeDrafter(reference, vocab)}.get(name, lambda: make_drafter(name))()
        out, _ = run(runner, prompt, drafter, new_tokens=48)
        assert out == expected, name


@pytest.mark.real
def test_real_model_copies_in_summarization(smollm2_plain):
    # the summary repeats phrases of the text: the copy drafter must accept tokens there (MAT above plain's 1.00)
    runner, prompts, plain = smollm2_plain
    _, stats = run(runner, prompts[0], make_drafter("copy"), new_tokens=48)
    assert stats.mat > 1.2
