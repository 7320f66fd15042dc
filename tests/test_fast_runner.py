"""The fast runner (models/fast) against the Hugging Face runner, in float32 on the CPU.

Both runners compute the same function with different code (own forward, static slot-indexed cache, gathered
commits), so their logits must agree to float32 rounding (relative error < 1e-4) at every step: prefill, chains,
trees, commits of non-prefix paths, aux rows, cache growth, chunked prefill. And speculative greedy decoding through
the fast runner must give exactly its own plain greedy output for every drafter.
"""

from __future__ import annotations

import pytest
import torch

from leapdecode import GenerationConfig, speculate
from leapdecode.drafters.base import Draft
from leapdecode.drafters.draft_model import DraftModel
from leapdecode.drafters.registry import make_drafter, names
from leapdecode.models.fast import FastConfig, FastRunner, supported, unsupported_reason
from leapdecode.models.fast.runner import step_inputs
from leapdecode.models.base import Model
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.tree import ancestor_mask, depths
from scripted_drafters import OracleDrafter, OracleTreeDrafter, RandomDrafter

ARCHS = ["llama", "qwen2", "gemma3"]
VOCAB = 64
TOLERANCE = 1e-4  # float32: two implementations of the same function differ by rounding only


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def lockstep(runners, prompt, steps):
    """Drive several runners through the same prefill and (root, draft, path) steps; yield each step's logits."""
    for r in runners:
        r.reset()
        r.prefill(prompt[:-1])
    for root, draft, path in steps:
        outs = [r.verify(root, draft) for r in runners]
        yield outs
        for r in runners:
            r.commit(path)


# A walk through the protocol: chain, tree with a non-prefix path committed, aux rows, empty drafts. The gemma3
# tiny model's sliding window is 16, so a 30-token prompt puts the window inside the prefix and the new rows.
PROMPT = [3, 9, 12, 5, 3, 9, 12, 5, 3, 9, 7, 1, 22, 40, 41, 42, 17, 7, 1, 22, 40, 11, 60, 2, 33, 18, 5, 27, 8, 13]
AUX = Draft(torch.tensor([4, 5]), torch.tensor([-1, 0]), aux_tokens=torch.tensor([6, 7, 8]),
            aux_positions=torch.tensor([1, 2, 3]),
            aux_mask=torch.tensor([[1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]], dtype=torch.bool))
STEPS = [
    (13, Draft.chain([20, 21, 22]), [0, 1]),
    (30, Draft.tree([5, 6, 7, 8, 9, 10], [-1, -1, 1, 2, 0, 4]), [1, 2, 3]),  # second branch: a gather
    (31, Draft.empty(), []),
    (32, AUX, [0]),
    (33, Draft.tree([1, 2, 3, 4], [-1, 0, -1, 2]), [2, 3]),
    (34, Draft.chain([7] * 9), []),
]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return tiny_model(request.param, vocab_size=VOCAB, seed=1)


def test_step_inputs_match_the_tree_module():
    # the runner builds its masks with numpy for speed; they must be tree.ancestor_mask and tree.depths exactly
    for parents in ([-1, 0, 1, 2], [-1, -1, 1, 2, 0, 4], [-1, 0, 0, 1, 1, 2, -1, 6], []):
        draft = Draft.tree(list(range(len(parents))), parents)
        tokens, offsets, tree = step_inputs(99, draft)
        assert tokens.tolist() == [99] + list(range(len(parents)))
        assert offsets.tolist() == [0] + depths(parents)
        assert torch.equal(torch.from_numpy(tree), ancestor_mask(parents))
    tokens, offsets, tree = step_inputs(1, AUX)
    assert tokens.tolist() == [1, 4, 5, 6, 7, 8] and offsets.tolist() == [0, 1, 2, 1, 2, 3]
    assert not tree[:3, 3:].any()  # verified nodes never see the aux branch
    assert torch.equal(torch.from_numpy(tree[3:]), AUX.aux_mask)


def test_logits_match_hf_runner(tiny):
    hf, fast = HFRunner(tiny.hf_model), FastRunner(tiny.hf_model)
    for step, (a, b) in enumerate(lockstep([hf, fast], PROMPT, STEPS)):
        assert a.shape == b.shape
        assert rel_err(b, a) < TOLERANCE, step
    assert fast.cache_len == hf.cache_len


def test_cache_growth_and_chunked_prefill_match(tiny):
    # capacity 8 forces the cache to double several times; 7-row prefill chunks cross slot buckets unevenly
    hf = HFRunner(tiny.hf_model)
    fast = FastRunner(tiny.hf_model, FastConfig(capacity=8, min_length=4, prefill_chunk=7))
    for step, (a, b) in enumerate(lockstep([hf, fast], PROMPT, STEPS)):
        assert rel_err(b, a) < TOLERANCE, step
    assert fast.cache.capacity == 64  # 8 -> 16 -> 32 -> 64 for the 30 + 16 tokens of this walk


def test_min_rows_padding_changes_nothing_on_cpu(tiny):
    # min_rows pads only graph steps; on the CPU it must be a no-op, and the eager path scores exactly r rows
    a = FastRunner(tiny.hf_model)
    b = FastRunner(tiny.hf_model, FastConfig(min_rows=16))
    for x, y in lockstep([a, b], PROMPT, STEPS):
        assert torch.equal(x, y)


def greedy(runner, prompt, drafter, new_tokens=40, budget=64):
    config = GenerationConfig(max_new_tokens=new_tokens, budget=budget, ignore_eos=True)
    return [t for step in speculate(runner, prompt, drafter, config) for t in step]


PROMPTS = [PROMPT[:10], PROMPT[10:21], PROMPT[21:]]


def test_plain_greedy_equals_hf_runner(tiny):
    # same function, float32: the plain greedy tokens are identical to the HF runner's
    hf, fast = HFRunner(tiny.hf_model), FastRunner(tiny.hf_model)
    for prompt in PROMPTS:
        assert greedy(fast, prompt, None) == greedy(hf, prompt, None)


def test_speculative_greedy_equals_plain(tiny):
    # lossless: every drafter gives the runner's own plain greedy output, token for token. Scripted drafters pin the
    # extremes (nothing accepted, exactly 3 accepted, trees with decoys) on every prompt and at a tight budget; the
    # registry's drafters (chains, trees, Lookahead's aux rows) run on the prompt with repeats, where they match.
    fast = FastRunner(tiny.hf_model)
    plains = [greedy(fast, prompt, None) for prompt in PROMPTS]
    assert all(len(set(plain)) >= 5 for plain in plains)  # not degenerate, so equality means something
    for prompt, plain in zip(PROMPTS, plains):
        reference = prompt + plain
        for drafter in (RandomDrafter(reference, VOCAB), OracleDrafter(reference, VOCAB, right=3),
                        OracleTreeDrafter(reference, VOCAB)):
            for budget in (64, 3):
                assert greedy(fast, prompt, drafter, budget=budget) == plain, (drafter.name, budget)
    for name in names():
        drafter = DraftModel(tiny.hf_model, num_draft_tokens=5) if name == "draft-model" else make_drafter(name)
        assert greedy(fast, PROMPTS[0], drafter) == plains[0], name


def test_target_drafting_for_itself_is_all_accepted(tiny):
    # the target's own greedy chain is accepted in full: 5 drafted + 1 bonus per step
    from leapdecode.stats import Stats

    fast = FastRunner(tiny.hf_model)
    stats = Stats()
    config = GenerationConfig(max_new_tokens=36, ignore_eos=True)
    list(speculate(fast, PROMPTS[0], DraftModel(tiny.hf_model, num_draft_tokens=5), config, stats=stats))
    assert stats.accepted_tokens == stats.draft_tokens and stats.mat == 6.0


def test_protocol_errors(tiny):
    fast = FastRunner(tiny.hf_model)
    fast.prefill([1, 2, 3])
    with pytest.raises(RuntimeError, match="commit without verify"):
        fast.commit([])
    fast.verify(4, Draft.chain([5]))
    with pytest.raises(RuntimeError, match="verify twice"):
        fast.verify(4, Draft.chain([5]))
    with pytest.raises(RuntimeError, match="prefill after verify"):
        fast.prefill([1])
    fast.commit([0])
    assert fast.cache_len == 5  # 3 prefilled + root + one accepted node


def test_positions_beyond_the_model_raise():
    model = tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=16)
    fast = FastRunner(model.hf_model)
    fast.prefill(list(range(12)))
    fast.verify(1, Draft.chain([1, 2, 3]))  # positions 12..15: the last ones the model has
    fast.commit([])
    with pytest.raises(ValueError, match="beyond the model's 16 positions"):
        fast.verify(1, Draft.chain([1, 2, 3]))  # root at 13, nodes up to 16


def test_config_validation():
    with pytest.raises(ValueError, match="max_graph_rows"):
        FastConfig(max_graph_rows=40)
    with pytest.raises(ValueError, match="min_rows"):
        FastConfig(min_rows=0)
    with pytest.raises(ValueError, match="min_length"):
        FastConfig(min_length=100)
    with pytest.raises(ValueError, match="capacity"):
        FastConfig(capacity=0)
    with pytest.raises(ValueError, match="graphs=True needs a CUDA device"):
        FastRunner(tiny_model("llama").hf_model, FastConfig(graphs=True))


def test_unsupported_models_are_refused_with_a_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not supported(gpt2) and "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="cannot run this model"):
        FastRunner(gpt2)
    dynamic = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "dynamic" in unsupported_reason(dynamic.hf_model)  # its frequencies change with the sequence length


def test_model_runner_kinds(tiny):
    assert isinstance(tiny.runner("hf"), HFRunner)
    fast = tiny.runner("fast")
    assert isinstance(fast, FastRunner) and tiny.runner("fast") is fast  # built once per model
    assert tiny.runner() is fast  # auto: a supported architecture on the CPU gets the fast runner
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = Model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), None, "gpt2", ())
    assert isinstance(gpt2.runner(), HFRunner)  # auto falls back to transformers for what it cannot run
    with pytest.raises(ValueError, match="unknown runner"):
        tiny.runner("turbo")


# --- real models ---------------------------------------------------------------------------------------------

@pytest.mark.real
def test_smollm2_logits_and_greedy(smollm2):
    hf, fast = HFRunner(smollm2.hf_model), FastRunner(smollm2.hf_model)
    prompt = smollm2.encode("Write a Python function that returns the n-th Fibonacci number.")
    steps = [(prompt[-1], Draft.chain([1, 2, 3]), [0]), (7, Draft.tree([5, 6, 7, 8], [-1, -1, 1, 2]), [1, 2]),
             (9, AUX, [0, 1])]
    for step, (a, b) in enumerate(lockstep([hf, fast], prompt, steps)):
        assert rel_err(b, a) < TOLERANCE, step
    plain = greedy(fast, prompt, None, new_tokens=24)
    assert plain == greedy(hf, prompt, None, new_tokens=24)  # float32: the same greedy tokens as transformers
    for name in ("pld", "copy"):
        assert greedy(fast, prompt, make_drafter(name), new_tokens=24) == plain, name


@pytest.fixture(scope="module")
def gemma3_270m():
    from leapdecode.models.load import load_model

    try:
        return load_model("gemma3-270m", device="cpu", dtype="float32")
    except ImportError as err:
        pytest.fail(f"the bundled Gemma 3 270M model is required: {err}", pytrace=False)


@pytest.mark.real
def test_gemma3_270m_logits(gemma3_270m):
    hf, fast = HFRunner(gemma3_270m.hf_model), FastRunner(gemma3_270m.hf_model)
    prompt = gemma3_270m.encode("The capital of France is Paris. The capital of Italy is", chat=False)
    steps = [(prompt[-1], Draft.chain([1, 2]), [0]), (7, Draft.tree([5, 6, 7, 8], [-1, -1, 1, 2]), [1, 2])]
    for step, (a, b) in enumerate(lockstep([hf, fast], prompt, steps)):
        assert rel_err(b, a) < TOLERANCE, step
