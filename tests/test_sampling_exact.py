"""Sampling exactness: speculative samples are distributed exactly as the (warped) target's, at two levels.

1. Acceptance level: a toy autoregressive target (a table p(next | prefix) over 6 tokens, with zeros) and a toy
   drafter q (another such table, close to p but not equal, with zeros elsewhere). A small loop of
   propose -> accept_sampled -> emit runs until 3 tokens are out; the law of those first 3 tokens, whatever the
   steps and wherever the bonus fell, must be the target's joint law p(x1) p(x2 | x1) p(x3 | x1 x2). Row i + 1 of p
   is the target at node i, i.e. p(. | context + tokens on the path to node i), so the rows are consistent with one
   autoregressive model. Checked for chains with q, deterministic chains, deterministic trees with distinct
   siblings, and multi-draft trees with q (siblings drawn without replacement); the distance must shrink with more
   samples, and a wrong rule (no residual correction) must fail the same check.
2. End to end through the decode loop (speculate + HFRunner) on tiny random-weight Llama models (vocab 12): the
   first 3 new tokens of independent seeded runs, with the library's DraftModel proposing chains with q (a noisy
   copy of the target) and with a deterministic tree drafter (top tokens of that copy), at temperature 1 and with
   temperature/top-k/top-p, against the exact law enumerated from the target (one batched forward pass over all
   12^2 two-token continuations gives every conditional, warping applied) and against plain sampling.

The distance is total variation; the thresholds in stats_util are rigorous finite-sample bounds that a correct
sampler exceeds with probability below 1e-6, so a failure is a real bug. They are conservative (observed distances
sit 2-4x below them), so the end-to-end level, with 600 runs per case to stay fast, catches gross errors (a
lossy loop emitting the draft model's law is shown to be caught), while the acceptance level, with 6000 samples,
catches biases of a few percent.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leapdecode.accept import Acceptance, accept_sampled
from leapdecode.decode import GenerationConfig, speculate
from leapdecode.drafters.base import Draft
from leapdecode.drafters.draft_model import DraftModel
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.sampling import SamplingConfig, sample, warp
from leapdecode.stats import Stats
from stats_util import (empirical_law, exact_sequence_law, marginal, tv_bound, tv_bound_two_sample,
                        tv_distance)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny forwards: see conftest.one_thread


# ================================================================ 1. acceptance level

VOCAB = 6
LENGTH = 3  # tokens of each sample whose joint law is compared (support VOCAB**LENGTH = 216)
N_SMALL, N_LARGE = 750, 6000  # the distance must shrink from N_SMALL to N_LARGE samples


def _prefix_key(prefix: tuple[int, ...]) -> int:
    """A distinct integer per prefix (base VOCAB + 1 digits, so different lengths never collide)."""
    key = 1
    for t in prefix:
        key = key * (VOCAB + 1) + t + 1
    return key


class ToyLM:
    """A fixed autoregressive law over VOCAB tokens: the next-token distribution after each prefix is drawn once
    from seeded generators (logits ~ N(0, 1.5^2), `zeros` tokens at probability 0).

    With `base` set, the logits are base's plus N(0, noise^2) and the zero set is drawn afresh: a drafter that is
    close to the target but wrong in places, including tokens the target forbids and tokens it never proposes.
    """

    def __init__(self, seed: int, zeros: int, base: ToyLM | None = None, noise: float = 0.8) -> None:
        self.seed, self.zeros, self.base, self.noise = seed, zeros, base, noise
        self._laws: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + _prefix_key(prefix))
        own = torch.randn(VOCAB, generator=gen)  # [vocab]
        if self.base is None:
            return own * 1.5
        return self.base.logits(prefix) + own * self.noise

    def law(self, prefix: tuple[int, ...]) -> torch.Tensor:
        """p(. | prefix) [vocab], float32, exact zeros on the forbidden tokens."""
        if prefix not in self._laws:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + _prefix_key(prefix) + 7)
            logits = self.logits(prefix).clone()
            logits[torch.randperm(VOCAB, generator=gen)[: self.zeros]] = float("-inf")
            self._laws[prefix] = logits.softmax(-1)
        return self._laws[prefix]


TARGET = ToyLM(seed=1, zeros=2)
DRAFT_LM = ToyLM(seed=2, zeros=1, base=TARGET)


def target_rows(context: tuple[int, ...], draft: Draft) -> torch.Tensor:
    """p [n + 1, vocab]: row 0 the target after the context (at the root), row i + 1 after the path to node i."""
    tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
    prefixes = [context]
    for i in range(draft.n):
        prefixes.append(prefixes[parents[i] + 1] + (tokens[i],))  # the parent's prefix plus node i's token
    return torch.stack([TARGET.law(prefix) for prefix in prefixes])


# ---------------------------------------------------------------- toy drafters

Rule = Callable[[Draft, torch.Tensor, torch.Generator], Acceptance]


def draw(law: torch.Tensor, rng: np.random.Generator, exclude: int | None = None) -> int:
    """One token from `law` [vocab] (optionally with `exclude` removed), by inverse CDF: a zero-probability token
    never comes out because its CDF step is empty. (numpy, so drafting stays cheap next to the rule under test.)"""
    probs = law.double().numpy().copy()
    if exclude is not None:
        probs[exclude] = 0.0
    cdf = np.cumsum(probs)  # [vocab]
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def without(law: torch.Tensor, token: int) -> torch.Tensor:
    """law [vocab] with `token` removed and renormalised: the law of a second draw without replacement."""
    left = law.clone()
    left[token] = 0.0
    return left / left.sum()


@dataclass(frozen=True)
class ToyDrafter:
    """How a toy drafter drafts after a context: `draw` picks the tree (tokens, parents) with the drafter's rng,
    `q_rows` gives q [n, vocab] for that tree (each node's proposal law) or None for a deterministic drafter."""

    draw: Callable[[tuple[int, ...], np.random.Generator], tuple[tuple[int, ...], tuple[int, ...]]]
    q_rows: Callable[[tuple[int, ...], tuple[int, ...]], torch.Tensor] | None = None


def _chain_with_q_draw(context, rng, depth=2):
    """A draft-model chain: x1 ~ q(. | context), x2 ~ q(. | context x1)."""
    tokens: tuple[int, ...] = ()
    for _ in range(depth):
        tokens += (draw(DRAFT_LM.law(context + tokens), rng),)
    return tokens, tuple(range(-1, depth - 1))


def _chain_q_rows(context, tokens):
    return torch.stack([DRAFT_LM.law(context + tokens[:i]) for i in range(len(tokens))])  # [n, vocab]


@functools.cache  # deterministic: a function of the context alone
def _greedy_chain(context, depth=3):
    """The drafter's greedy chain (no q: one-hot proposals)."""
    tokens: tuple[int, ...] = ()
    for _ in range(depth):
        tokens += (int(DRAFT_LM.law(context + tokens).argmax()),)
    return tokens, tuple(range(-1, depth - 1))


@functools.cache  # deterministic: a function of the context alone
def _top_k_tree(context, widths=(3, 2, 1)):
    """Top-3 drafter tokens at the root, top-2 below each, top-1 below those: 15 nodes, depth 3, distinct siblings."""
    tokens, parents = [], []
    level = [(-1, context)]  # (node, prefix) of the previous level
    for width in widths:
        next_level = []
        for node, prefix in level:
            for token in DRAFT_LM.law(prefix).topk(width).indices.tolist():
                tokens.append(token)
                parents.append(node)
                next_level.append((len(tokens) - 1, prefix + (token,)))
        level = next_level
    return tuple(tokens), tuple(parents)


def _multi_draft_draw(context, rng):
    """Two root children a, b drawn from q without replacement, then one child under each drawn from q."""
    a = draw(DRAFT_LM.law(context), rng)
    b = draw(DRAFT_LM.law(context), rng, exclude=a)
    return (a, b, draw(DRAFT_LM.law(context + (a,)), rng), draw(DRAFT_LM.law(context + (b,)), rng)), (-1, -1, 0, 1)


def _multi_draft_q_rows(context, tokens):
    # q[i] is the law node i was actually drawn from: for the second root child, q without the first child's token
    a, b = tokens[:2]
    q_root = DRAFT_LM.law(context)
    return torch.stack([q_root, without(q_root, a), DRAFT_LM.law(context + (a,)), DRAFT_LM.law(context + (b,))])


CASES = {
    "chain_with_q": ToyDrafter(_chain_with_q_draw, _chain_q_rows),
    "chain_deterministic": ToyDrafter(lambda context, rng: _greedy_chain(context)),
    "tree_deterministic": ToyDrafter(lambda context, rng: _top_k_tree(context)),
    "multi_draft_with_q": ToyDrafter(_multi_draft_draw, _multi_draft_q_rows),
}


# ---------------------------------------------------------------- wrong rules (negative controls)


def accept_without_residual(draft: Draft, p: torch.Tensor, gen: torch.Generator) -> Acceptance:
    """WRONG: accepts chain token x with probability min(1, p(x)/q(x)) (q one-hot for deterministic drafts) but
    corrects a rejection with a draw from p instead of norm(max(0, p - q)): drafted tokens come out too often."""
    path: list[int] = []
    for i, x in enumerate(draft.tokens.tolist()):
        ratio = p[i, x] if draft.q is None else p[i, x] / draft.q[i, x]
        if not bool(torch.rand((), generator=gen) < ratio):
            return Acceptance(path, sample(p[i], gen))
        path.append(i)
    return Acceptance(path, sample(p[draft.n], gen))


# ---------------------------------------------------------------- the loop and the check


def speculative_samples(drafter: ToyDrafter, rule: Rule, n: int, seed: int) -> tuple[np.ndarray, float]:
    """n samples [n, LENGTH] of the first LENGTH emitted tokens, and the mean accepted draft tokens per step.

    Each sample runs steps (draft, accept, emit path tokens + bonus) until LENGTH tokens are out, as decoding does.
    Drafts and their target rows are memoised per (context, tree): the same trees recur, and both are pure
    functions of it. The drafter draws with its own numpy rng, the rule with a torch generator.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    memo: dict[tuple, tuple[Draft, torch.Tensor]] = {}
    out = np.empty((n, LENGTH), dtype=np.int64)
    accepted = steps = 0
    for s in range(n):
        context: tuple[int, ...] = ()
        while len(context) < LENGTH:
            tokens, parents = drafter.draw(context, rng)
            key = (context, tokens, parents)
            if key not in memo:
                q = drafter.q_rows(context, tokens) if drafter.q_rows else None
                draft = Draft(torch.tensor(tokens), torch.tensor(parents), q)
                memo[key] = (draft, target_rows(context, draft))
            draft, p = memo[key]  # p [n + 1, vocab]
            result = rule(draft, p, gen)
            context += tuple(tokens[i] for i in result.path) + (result.bonus,)
            accepted += len(result.path)
            steps += 1
        out[s] = context[:LENGTH]
    return out, accepted / steps


EXACT = exact_sequence_law(lambda prefix: TARGET.law(prefix).numpy(), VOCAB, LENGTH)  # [216]


def test_toy_models_are_not_trivial():
    # the check is only meaningful if the drafter is wrong in places: p has zeros (forbidden tokens), q has zeros
    # where p does not, and q differs from p by a visible amount at the root
    p, q = TARGET.law(()), DRAFT_LM.law(())
    assert (p == 0).sum() == 2 and (q == 0).sum() == 1
    assert bool(((q == 0) & (p > 0)).any()) or bool(((p == 0) & (q > 0)).any())
    assert tv_distance(p.numpy(), q.numpy()) > 0.1
    assert abs(EXACT.sum() - 1.0) < 1e-6  # float32 rows


@pytest.mark.parametrize("case", list(CASES))
def test_acceptance_law_equals_target_law(case):
    samples, mean_accepted = speculative_samples(CASES[case], accept_sampled, N_LARGE, seed=100)
    # the drafts must actually be accepted often (else this would only test plain sampling) and rejected often
    # (else it would not test the correction); one step can accept at most LENGTH - 1 useful tokens here
    assert 0.3 < mean_accepted < 2.5, mean_accepted
    tv_small = tv_distance(empirical_law(samples[:N_SMALL], VOCAB), EXACT)
    tv_large = tv_distance(empirical_law(samples, VOCAB), EXACT)
    # a correct rule stays within the finite-sample bound at both sizes (false alarm < 1e-6 each) ...
    assert tv_small <= tv_bound(EXACT, N_SMALL), (tv_small, tv_bound(EXACT, N_SMALL))
    assert tv_large <= tv_bound(EXACT, N_LARGE), (tv_large, tv_bound(EXACT, N_LARGE))
    # ... and converges: 8x the samples shrink the expected distance ~sqrt(8) = 2.8x
    assert tv_large < tv_small, (tv_small, tv_large)


@pytest.mark.parametrize("case", ["chain_deterministic", "chain_with_q"])
def test_wrong_rule_fails_the_same_check(case):
    # the same sample size and bound; a biased rule's distance stays near its bias (about 0.34 for the deterministic
    # chain, 0.13 with q) instead of shrinking, so it exceeds the bound (0.067): proof that the check can fail
    samples, _ = speculative_samples(CASES[case], accept_without_residual, N_LARGE, seed=100)
    tv_large = tv_distance(empirical_law(samples, VOCAB), EXACT)
    assert tv_large > tv_bound(EXACT, N_LARGE), (tv_large, tv_bound(EXACT, N_LARGE))


# ================================================================ 2. end to end through the decode loop

E2E_VOCAB = 12
E2E_LENGTH = 3  # new tokens per run; their joint law has 12^3 = 1728 outcomes
E2E_RUNS = 600  # runs per (drafter, sampling config); each costs ~2-5 tiny forward passes
# one layer keeps a forward pass cheap; initializer_range 0.35 gives laws that are neither flat nor one-hot
E2E_SHAPE = dict(num_hidden_layers=1, initializer_range=0.35)
# one token, the root: no prefill pass is needed and every run is only verify steps. Token 3 starts laws that are
# spread at every position (about 3 likely first tokens, ~30 likely 3-token sequences) for these weights.
E2E_PROMPT = [3]
E2E_CONFIGS = {
    "t1": SamplingConfig(temperature=1.0),
    "topk_topp": SamplingConfig(temperature=1.2, top_k=5, top_p=0.9),
}
# laws compared: each position alone, the first two jointly, all three jointly (the bounds adapt to each support)
E2E_MARGINALS = [(0,), (1,), (2,), (0, 1), (0, 1, 2)]


class TopTreeDrafter:
    """A deterministic tree drafter (q None) with distinct siblings: the children of each node are the top tokens of
    a fixed model's law after that node's prefix (`next_law(prefix) -> [vocab]`), so the draft depends on the
    context alone, never on the acceptance's random draws.

    Nodes are listed best first, as real tree drafters do, because the loop caps a step at `budget` nodes and a
    prefix of the list must stay a useful tree: 3 nodes are the two best root children and the best child of the
    first; 8 reach depth 3.
    """

    name = "top-tree"
    PARENTS = (-1, -1, 0, 2, -1, 0, 1, 5)  # root: children 0, 1, 4; node 0: children 2, 5; depth up to 3

    def __init__(self, next_law: Callable[[tuple[int, ...]], torch.Tensor]) -> None:
        self.next_law = next_law

    def reset(self, prompt, sampling) -> None:
        pass

    def observe(self, step) -> None:
        pass

    def propose(self, context, budget) -> Draft:
        n = min(budget, len(self.PARENTS))  # parents precede children, so any prefix of the nodes is a tree
        parents = self.PARENTS[:n]
        tokens = [0] * n
        prefixes = {-1: tuple(int(t) for t in context)}
        for node in range(n):  # a node's parent is filled in before it, so its prefix is known
            parent = parents[node]
            rank = parents[:node].count(parent)  # earlier siblings take the better tokens
            tokens[node] = int(self.next_law(prefixes[parent]).topk(rank + 1).indices[rank])
            prefixes[node] = prefixes[parent] + (tokens[node],)
        return Draft.tree(tokens, parents) if n else Draft.empty()


def model_law(hf_model, sampling: SamplingConfig) -> np.ndarray:
    """Exact law [vocab^3] of the first 3 tokens after E2E_PROMPT, by one batched forward over every prompt + x1 x2.

    Row k of the batch is E2E_PROMPT + (x1, x2) with k = x1 * V + x2; its last three positions give the warped
    p(x1), p(x2 | x1) and p(x3 | x1 x2).
    """
    vocab = E2E_VOCAB
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # [V^2, 2], lexicographic
    ids = torch.cat([torch.tensor(E2E_PROMPT).expand(len(pairs), -1), pairs], dim=1)  # [V^2, P + 2]
    with torch.inference_mode():
        p = warp(hf_model(input_ids=ids).logits[:, -3:], sampling).double()  # [V^2, 3, V]
    p1 = p[0, 0]  # [V] the same in every row
    p2 = p[::vocab, 1]  # [V (x1), V (x2)], rows with x2 = 0 (position -2 sees only prompt + x1)
    p3 = p[:, 2].reshape(vocab, vocab, vocab)  # [x1, x2, x3]
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1).numpy()


@pytest.fixture(scope="module")
def e2e():
    """The target (tiny Llama), a draft model close to it (the same weights plus noise), the runner, and a cache
    of samples per (drafter, config) so tests share them."""
    target = tiny_model("llama", vocab_size=E2E_VOCAB, seed=1, **E2E_SHAPE)
    draft = tiny_model("llama", vocab_size=E2E_VOCAB, seed=1, **E2E_SHAPE)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for weight in draft.hf_model.parameters():  # noise at 1/10 of the init scale: close, yet often wrong
            weight.add_(torch.randn(weight.shape, generator=noise) * 0.1 * E2E_SHAPE["initializer_range"])
    runner = HFRunner(target.hf_model)
    laws: dict[tuple[int, ...], torch.Tensor] = {}

    def draft_next_law(prefix: tuple[int, ...]) -> torch.Tensor:
        """The draft model's law [vocab] after a full context (no cache; memoised, few contexts recur)."""
        if prefix not in laws:
            with torch.inference_mode():
                laws[prefix] = draft.hf_model(input_ids=torch.tensor([prefix])).logits[0, -1].softmax(-1)
        return laws[prefix]

    # drafter factory and max_new_tokens: the loop caps a step at max_new_tokens - 1 - (emitted so far) nodes, so
    # the tree runs go on to 4 tokens to let the first step verify 3 nodes (two root children, one grandchild);
    # only the first 3 tokens are compared
    drafters = {
        "none": (lambda: None, E2E_LENGTH),
        "draft_model": (lambda: DraftModel(draft.hf_model, num_draft_tokens=2), E2E_LENGTH),
        "tree": (lambda: TopTreeDrafter(draft_next_law), E2E_LENGTH + 1),
    }
    cache: dict[tuple[str, str], tuple[np.ndarray, float]] = {}

    def samples(drafter_name: str, config_name: str) -> tuple[np.ndarray, float]:
        """[E2E_RUNS, 3] first new tokens of independent runs, and the MAT over all runs."""
        key = (drafter_name, config_name)
        if key not in cache:
            make_drafter, max_new_tokens = drafters[drafter_name]
            drafter = make_drafter()
            base = E2E_CONFIGS[config_name]
            # even seeds only: DraftModel seeds its own generator with seed + 1, which must not be another run's seed
            offset = 2 * E2E_RUNS * (list(drafters).index(drafter_name) * len(E2E_CONFIGS)
                                     + list(E2E_CONFIGS).index(config_name))
            out = np.empty((E2E_RUNS, E2E_LENGTH), dtype=np.int64)
            steps = emitted = 0
            for run in range(E2E_RUNS):
                sampling = dataclasses.replace(base, seed=offset + 2 * run)
                config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, ignore_eos=True)
                stats = Stats()
                new = [t for step in speculate(runner, E2E_PROMPT, drafter, config, stats=stats) for t in step]
                out[run] = new[:E2E_LENGTH]
                steps += stats.steps
                emitted += len(new)
            cache[key] = (out, emitted / steps)
        return cache[key]

    return SimpleNamespace(target=target, draft=draft, samples=samples,
                           exact={name: model_law(target.hf_model, c) for name, c in E2E_CONFIGS.items()},
                           draft_law={name: model_law(draft.hf_model, c) for name, c in E2E_CONFIGS.items()})


def test_e2e_exact_law_is_a_spread_law(e2e):
    # the enumeration is a law, and a spread one: sampling must have real choices to get wrong
    for name, law in e2e.exact.items():
        assert abs(law.sum() - 1.0) < 1e-6
        assert (law > 0.01).sum() >= 10, name


def test_e2e_check_would_catch_a_lossy_drafter(e2e):
    # sensitivity: a lossy loop that emitted the draft model's law instead of the target's would sit at a TV
    # distance beyond twice the bound on at least one compared law, so its samples (which stray from their own law
    # by less than one bound) would fail the checks below
    for name, exact in e2e.exact.items():
        ratios = [tv_distance(*(marginal(law, E2E_VOCAB, E2E_LENGTH, keep) for law in (e2e.draft_law[name], exact)))
                  / tv_bound(marginal(exact, E2E_VOCAB, E2E_LENGTH, keep), E2E_RUNS) for keep in E2E_MARGINALS]
        assert max(ratios) > 2, (name, ratios)


@pytest.mark.parametrize("drafter_name, config_name", [("draft_model", "t1"), ("draft_model", "topk_topp"),
                                                       ("tree", "t1"), ("tree", "topk_topp"), ("none", "t1")])
def test_e2e_samples_follow_the_exact_law(e2e, drafter_name, config_name):
    samples, mat = e2e.samples(drafter_name, config_name)
    if drafter_name != "none":
        assert mat > 1.3, mat  # drafts are accepted often: speculation, not just plain sampling, is under test
    empirical = empirical_law(samples, E2E_VOCAB)
    exact = e2e.exact[config_name]
    for keep in E2E_MARGINALS:
        emp, ex = (marginal(law, E2E_VOCAB, E2E_LENGTH, keep) for law in (empirical, exact))
        assert tv_distance(emp, ex) <= tv_bound(ex, E2E_RUNS), (keep, tv_distance(emp, ex), tv_bound(ex, E2E_RUNS))


@pytest.mark.parametrize("drafter_name", ["draft_model", "tree"])
def test_e2e_samples_match_plain_sampling(e2e, drafter_name):
    # two-sample comparison with plain sampling through the same loop (drafter None), at temperature 1
    spec, _ = e2e.samples(drafter_name, "t1")
    plain, _ = e2e.samples("none", "t1")
    exact = e2e.exact["t1"]
    for keep in E2E_MARGINALS:
        a, b = (marginal(empirical_law(s, E2E_VOCAB), E2E_VOCAB, E2E_LENGTH, keep) for s in (spec, plain))
        bound = tv_bound_two_sample(marginal(exact, E2E_VOCAB, E2E_LENGTH, keep), E2E_RUNS, E2E_RUNS)
        assert tv_distance(a, b) <= bound, (keep, tv_distance(a, b), bound)
