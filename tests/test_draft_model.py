"""DraftModel: KV-cached chain drafting must equal what the draft model says without a cache.

Every expected value here is computed independently with plain full forward passes over the whole sequence (no
cache), so any mistake in the cache sync (crop, positions, feeding) shows up as a different token or distribution.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, LlamaModel

from leapdecode.drafters.base import Draft, Drafter
from leapdecode.drafters.draft_model import DraftModel
from leapdecode.models.base import Model
from leapdecode.sampling import SamplingConfig, warp

VOCAB = 64
SAMPLING = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, seed=7)


def _llama_config() -> LlamaConfig:
    # initializer_range 0.5 (not 0.02): peaked, context-dependent logits, so a wrong position or a stale cache
    # entry changes the argmax instead of hiding in a near-uniform distribution
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, initializer_range=0.5)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config()).eval()


@pytest.fixture(scope="module")
def gemma3() -> Gemma3ForCausalLM:
    """Sliding-window attention (window 4) on layer 0: contexts longer than the window check that crops still work."""
    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, head_dim=8, sliding_window=4,
                              initializer_range=0.5, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


PROMPT = [3, 17, 42, 8, 8, 51, 29, 60, 11]


@torch.inference_mode()
def plain_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits [vocab] after the last token, from one full forward with no cache."""
    return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def plain_greedy(model, context: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(plain_logits(model, context + out).argmax()))
    return out


class ForwardSizes:
    """Records how many tokens each forward pass of a model is fed (a real forward hook, not a mock)."""

    def __init__(self, model) -> None:
        self.sizes: list[int] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        self.sizes.append(int(kwargs["input_ids"].shape[1]))

    def take(self) -> list[int]:
        sizes, self.sizes = self.sizes, []
        return sizes

    def close(self) -> None:
        self._handle.remove()


def test_is_a_drafter(llama) -> None:
    drafter = DraftModel(llama)
    assert isinstance(drafter, Drafter)
    assert drafter.name == "draft-model" and drafter.description
    assert drafter.vocab_size == VOCAB


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_draft_is_plain_greedy_continuation(arch, request) -> None:
    model = request.getfixturevalue(arch)
    drafter = DraftModel(model, num_draft_tokens=5)
    drafter.reset(PROMPT, SamplingConfig())
    draft = drafter.propose(PROMPT, budget=8)
    # the cached chain must be the model's own greedy continuation, computed here without any cache
    assert draft.tokens.tolist() == plain_greedy(model, PROMPT, 5)
    assert draft.is_chain and draft.q is None  # greedy drafts are deterministic


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_context_edits_keep_cache_in_sync(arch, request) -> None:
    model = request.getfixturevalue(arch)
    drafter = DraftModel(model, num_draft_tokens=5)
    drafter.reset(PROMPT, SamplingConfig())
    sizes = ForwardSizes(model)
    try:
        def check(context: list[int], fed: list[int]) -> None:
            expected = plain_greedy(model, context, 5)
            sizes.take()  # drop the plain reference passes; count only the drafter's own
            assert drafter.propose(context, budget=5).tokens.tolist() == expected
            assert sizes.take() == fed

        first = plain_greedy(model, PROMPT, 5)
        # the prompt once, then one token per further draft step; the 5th drafted token is never fed
        check(PROMPT, [len(PROMPT), 1, 1, 1, 1])

        # the target kept 2 tokens and emitted a different bonus: the cache must drop drafted tokens 3 and 4;
        # only the bonus is new (the 2 accepted tokens were cached while drafting): no recomputation of the prompt
        context = PROMPT + first[:2] + [(first[2] + 1) % VOCAB]
        check(context, [1, 1, 1, 1, 1])

        # the target accepted all 5 and added a bonus: the 5th drafted token (never fed) and the bonus are new
        second = plain_greedy(model, context, 5)
        context = context + second + [(second[0] + 3) % VOCAB]
        check(context, [2, 1, 1, 1, 1])

        # nothing accepted, the bonus replaced the first node: after the crop only the new root is fed
        third = plain_greedy(model, context, 5)
        context = context + [(third[0] + 5) % VOCAB]
        check(context, [1, 1, 1, 1, 1])

        # the same context proposed twice (the cache covers more than the context): the root is re-fed for its logits
        check(context, [1, 1, 1, 1, 1])

        # a context that leaves the cached one early (an edit inside the prompt) still drafts correctly
        check(PROMPT[:4] + [9, 9], [2, 1, 1, 1, 1])
    finally:
        sizes.close()


def test_reset_makes_the_drafter_reusable(llama) -> None:
    drafter = DraftModel(llama, num_draft_tokens=4)
    drafter.reset(PROMPT, SamplingConfig())
    drafter.propose(PROMPT, budget=4)
    other = [5, 6, 7]
    drafter.reset(other, SamplingConfig())
    expected = plain_greedy(llama, other, 4)
    sizes = ForwardSizes(llama)
    try:
        # a reset empties the cache: the whole new prompt is fed, and the draft is its plain greedy continuation
        assert drafter.propose(other, budget=4).tokens.tolist() == expected
        assert sizes.take() == [3, 1, 1, 1]
    finally:
        sizes.close()


def test_sampling_q_is_the_warped_draft_distribution(llama) -> None:
    drafter = DraftModel(llama, num_draft_tokens=5)
    drafter.reset(PROMPT, SAMPLING)
    context = PROMPT + [12, 30]
    drafter.propose(PROMPT, budget=5)  # leaves a cache that must be cropped for the next context
    draft = drafter.propose(context, budget=5)
    tokens = draft.tokens.tolist()
    assert draft.is_chain and draft.q is not None
    assert draft.q.shape == (5, VOCAB) and draft.q.dtype == torch.float32
    torch.testing.assert_close(draft.q.sum(-1), torch.ones(5))  # each row is a distribution
    for i, token in enumerate(tokens):
        assert draft.q[i, token] > 0  # a token was drawn from q[i], so q[i] cannot rule it out
        # q[i] is the warped distribution after context + tokens[:i], here computed without a cache
        expected = warp(plain_logits(llama, context + tokens[:i]), SAMPLING)
        torch.testing.assert_close(draft.q[i], expected, atol=1e-5, rtol=1e-4)


def test_sampling_seed_reproduces_the_draft(llama) -> None:
    def run(drafter: DraftModel, seed: int) -> list[Draft]:
        drafter.reset(PROMPT, SamplingConfig(temperature=1.5, seed=seed))  # hot: draws are far from argmax
        return [drafter.propose(PROMPT, budget=5), drafter.propose(PROMPT + [1], budget=5)]

    drafter = DraftModel(llama)
    a, b = run(drafter, 11), run(DraftModel(llama), 11)
    c = run(drafter, 11)  # the same drafter after a reset restarts its random stream
    for x, y, z in zip(a, b, c):
        assert x.tokens.tolist() == y.tokens.tolist() == z.tokens.tolist()
        assert torch.equal(x.q, y.q) and torch.equal(x.q, z.q)
    # another seed gives another draft: 10 tokens at temperature 1.5 over 64 ids agree by chance with odds ~1e-10
    d = run(drafter, 12)
    assert [x.tokens.tolist() for x in a] != [x.tokens.tolist() for x in d]


def test_budget_caps_the_draft(llama) -> None:
    drafter = DraftModel(llama, num_draft_tokens=5)
    drafter.reset(PROMPT, SamplingConfig())
    full = plain_greedy(llama, PROMPT, 5)
    # a smaller budget gives a prefix of the same chain; a larger one is capped at num_draft_tokens
    assert drafter.propose(PROMPT, budget=2).tokens.tolist() == full[:2]
    assert drafter.propose(PROMPT, budget=50).tokens.tolist() == full
    assert drafter.propose(PROMPT, budget=0).n == 0  # budget 0: plain decoding for this step
    drafter.reset(PROMPT, SAMPLING)
    draft = drafter.propose(PROMPT, budget=3)
    assert draft.n == 3 and draft.q.shape == (3, VOCAB)
    with pytest.raises(ValueError, match="budget"):
        drafter.propose(PROMPT, budget=-1)
    with pytest.raises(ValueError, match="context"):
        drafter.propose([], budget=3)


def test_accepts_a_leapdecode_model(llama) -> None:
    drafter = DraftModel(Model(hf_model=llama, tokenizer=None, name="tiny-llama", eos_token_ids=()))
    drafter.reset(PROMPT, SamplingConfig())
    # the wrapper is unwrapped to the same HF model, so the greedy chain is the same
    assert drafter.propose(PROMPT, budget=5).tokens.tolist() == plain_greedy(llama, PROMPT, 5)


def test_vocab_size_cuts_padded_ids(llama) -> None:
    drafter = DraftModel(llama, vocab_size=48)
    drafter.reset(PROMPT, SAMPLING)
    draft = drafter.propose(PROMPT, budget=5)
    tokens = draft.tokens.tolist()
    assert draft.q.shape == (5, 48) and max(tokens) < 48
    for i in range(5):
        # q is warped from the first 48 logits only, as if the draft's vocabulary had 48 ids
        expected = warp(plain_logits(llama, PROMPT + tokens[:i])[:48], SAMPLING)
        torch.testing.assert_close(draft.q[i], expected, atol=1e-5, rtol=1e-4)


def test_parameter_validation(llama) -> None:
    with pytest.raises(ValueError, match="model"):
        DraftModel(None)
    with pytest.raises(ValueError, match="model"):
        DraftModel("not a model")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="LM head"):
        DraftModel(LlamaModel(_llama_config()))  # a bare decoder has hidden states, not token logits
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_draft_tokens"):
            DraftModel(llama, num_draft_tokens=bad)
    for bad in (0, VOCAB + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            DraftModel(llama, vocab_size=bad)
