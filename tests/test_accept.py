"""Acceptance rules on hand-built logits and literal trees.

Logit rows are written so that the argmax (greedy) or the distribution (sampling) of each row is obvious: row 0 is
the target at the root, row i + 1 the target at draft node i.
"""

from __future__ import annotations

import pytest
import torch

from leapdecode.accept import Acceptance, accept, accept_greedy, accept_sampled
from leapdecode.drafters.base import Draft
from leapdecode.sampling import SamplingConfig, make_generator, warp

VOCAB = 6


def argmax_rows(best: list[int], vocab: int = VOCAB) -> torch.Tensor:
    """Logits [len(best), vocab] whose row r has its unique maximum at token best[r] (other entries spread out)."""
    logits = torch.arange(vocab, dtype=torch.float32).repeat(len(best), 1) * 0.1  # [rows, vocab] ties broken
    logits[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return logits


def one_hot_rows(best: list[int], vocab: int = VOCAB) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(best), vocab).float()  # [rows, vocab]


def outcome(result: Acceptance) -> tuple[tuple[int, ...], int]:
    """A hashable (path, bonus) pair."""
    return tuple(result.path), result.bonus


def dist(*probs: float) -> torch.Tensor:
    p = torch.tensor(probs, dtype=torch.float32)
    assert len(probs) == VOCAB and abs(float(p.sum()) - 1.0) < 1e-6
    return p


# ---------------------------------------------------------------- greedy


def test_greedy_chain_all_accepted_bonus_from_last_row():
    # the target's argmax at the root is 3 (= node 0), at node 0 it is 1 (= node 1), at node 1 it is 4 (= node 2):
    # all three drafted tokens are accepted and the bonus is the argmax of the last row (node 2's row) = 5
    draft = Draft.chain([3, 1, 4])
    assert accept_greedy(draft, argmax_rows([3, 1, 4, 5])) == Acceptance([0, 1, 2], 5)


@pytest.mark.parametrize("j", [0, 1, 2])
def test_greedy_chain_rejects_at_depth_j(j):
    # rows agree with the draft [3, 1, 4] before row j; row j's argmax is 0, which differs from tokens[j]:
    # nodes 0..j-1 are accepted and the bonus (the correction) is row j's argmax, 0
    draft = Draft.chain([3, 1, 4])
    best = [3, 1, 4, 5]
    best[j] = 0
    assert accept_greedy(draft, argmax_rows(best)) == Acceptance(list(range(j)), 0)


def test_greedy_empty_draft_is_plain_decoding():
    # no nodes: nothing to accept, the bonus is the root's argmax, exactly one plain decoding step
    assert accept_greedy(Draft.empty(), argmax_rows([2])) == Acceptance([], 2)


# A tree over the root:            root
#                               /    |     \
#                       n0:2    n1:5     n4:0
#                        |        |
#                      n3:4     n2:1
#                                 |
#                               n5:3
TREE_TOKENS = [2, 5, 1, 4, 0, 3]
TREE_PARENTS = [-1, -1, 1, 0, -1, 2]


def test_greedy_tree_follows_argmax_child_to_depth_three():
    # root argmax 5 -> n1; n1's row (row 2) argmax 1 -> n2; n2's row (row 3) argmax 3 -> n5; n5's row (row 6)
    # argmax 2 is the bonus. Rows of nodes off the path (n0, n3, n4) carry argmaxes that must be ignored.
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    rows = [5, 4, 1, 3, 0, 0, 2]  # row 0 root, row i + 1 node i
    assert accept_greedy(draft, argmax_rows(rows)) == Acceptance([1, 2, 5], 2)


def test_greedy_tree_sibling_order_is_irrelevant():
    # the same tree with the root's children listed in another order: the accepted *tokens* and the bonus are the
    # same, only the node indices differ (n1 -> m0, n2 -> m1, n5 -> m2 below)
    #   m0:5 (child of root), m1:1 (child of m0), m2:3 (child of m1), m3:0 (root), m4:2 (root), m5:4 (child of m4)
    draft = Draft.tree([5, 1, 3, 0, 2, 4], [-1, 0, 1, -1, -1, 4])
    rows = [5, 1, 3, 2, 0, 0, 0]  # root -> 5 (m0), m0 -> 1 (m1), m1 -> 3 (m2), m2 -> bonus 2
    result = accept_greedy(draft, argmax_rows(rows))
    assert result == Acceptance([0, 1, 2], 2)
    assert draft.tokens[result.path].tolist() == [5, 1, 3]  # the same tokens as the original order's [1, 2, 5]


def test_greedy_tree_no_child_matches():
    # root argmax 3 is none of the root's children (2, 5, 0): nothing accepted, bonus 3
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    assert accept_greedy(draft, argmax_rows([3, 4, 1, 3, 0, 0, 2])) == Acceptance([], 3)


def test_greedy_tree_stops_at_leaf_of_other_branch():
    # root argmax 2 -> n0; n0's row argmax 4 -> n3 (a leaf); the leaf's row (row 4) argmax 1 is the bonus
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    assert accept_greedy(draft, argmax_rows([2, 4, 0, 0, 1, 0, 0])) == Acceptance([0, 3], 1)


# ---------------------------------------------------------------- sampling, hand-checkable cases


def test_sampling_one_hot_p_is_greedy_chain_and_tree():
    # a one-hot p puts all mass on the argmax: every draw of y ~ p (or u < p(x)) reproduces the greedy walk
    gen = make_generator(0)
    chain = Draft.chain([3, 1, 4])
    for best in ([3, 1, 4, 5], [3, 0, 4, 5], [0, 1, 4, 5]):
        assert accept_sampled(chain, one_hot_rows(best), gen) == accept_greedy(chain, argmax_rows(best))
    tree = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    for best in ([5, 4, 1, 3, 0, 0, 2], [2, 4, 0, 0, 1, 0, 0], [3, 4, 1, 3, 0, 0, 2]):
        assert accept_sampled(tree, one_hot_rows(best), gen) == accept_greedy(tree, argmax_rows(best))


def test_sampling_one_hot_p_with_q_is_greedy():
    # with a drafter q: p(x) = 1 gives ratio p/q >= 1 (always accepted), p(x) = 0 gives ratio 0 (always rejected), and
    # the residual max(0, p - q) is then nonzero only at p's one-hot token: the greedy correction
    q = torch.full((3, VOCAB), 1.0 / VOCAB)  # [3, vocab]
    chain = Draft.chain([3, 1, 4], q=q)
    gen = make_generator(1)
    for best in ([3, 1, 4, 5], [3, 0, 4, 5], [0, 1, 4, 5]):
        for _ in range(20):
            assert accept_sampled(chain, one_hot_rows(best), gen) == accept_greedy(chain, argmax_rows(best))


def test_sampling_p_equals_q_accepts_everything():
    # p == q makes every ratio p(x)/q(x) = 1, so every drafted token is accepted whatever the uniform draw is;
    # the bonus is then drawn from p at the last node, which is one-hot at 2 here
    q = torch.stack([dist(.1, .2, .3, .1, .2, .1), dist(.3, .3, .1, .1, .1, .1)])  # [2, vocab]
    p = torch.cat([q, one_hot_rows([2])])  # [3, vocab]
    chain = Draft.chain([4, 0], q=q)
    gen = make_generator(2)
    for _ in range(200):
        assert accept_sampled(chain, p, gen) == Acceptance([0, 1], 2)


def test_sampling_zero_target_probability_is_never_accepted():
    # p(x) = 0 for the drafted token x = 1: ratio 0 rejects it always; the correction comes from max(0, p - q),
    # which is 0 at x, so x is never emitted either
    q = torch.stack([dist(.1, .5, .1, .1, .1, .1)])  # [1, vocab]
    p = torch.stack([dist(.2, 0., .2, .2, .2, .2), one_hot_rows([3])[0]])  # [2, vocab]
    chain = Draft.chain([1], q=q)
    gen = make_generator(3)
    bonuses = set()
    for _ in range(300):
        result = accept_sampled(chain, p, gen)
        assert result.path == [] and result.bonus != 1
        bonuses.add(result.bonus)
    assert bonuses == {0, 2, 3, 4, 5}  # the residual (.1, 0, .1, .1, .1, .1)/.5 covers every other token


def test_sampling_deterministic_zero_target_probability_is_never_accepted():
    # a deterministic draft (q None) of token 1 where p(1) = 0: never accepted, and the bonus ~ p never is 1
    p = torch.stack([dist(.2, 0., .2, .2, .2, .2), one_hot_rows([3])[0]])  # [2, vocab]
    gen = make_generator(4)
    for _ in range(300):
        result = accept_sampled(Draft.chain([1]), p, gen)
        assert result.path == [] and result.bonus != 1


def test_sampling_rejection_samples_the_residual():
    # drafted x = 0 with q(0) = .6 and p(0) = .1: accepted with probability 1/6. On rejection the correction is a
    # draw of norm(max(0, p - q)) = norm((0, .5, 0, 0, 0, 0)), i.e. always token 1 (p alone would also give 0 or 2).
    # After an acceptance the bonus comes from row 1, one-hot at 5. So only ([], 1) and ([0], 5) can occur.
    q = torch.stack([dist(.6, 0., .4, 0., 0., 0.)])  # [1, vocab]
    p = torch.stack([dist(.1, .5, .4, 0., 0., 0.), one_hot_rows([5])[0]])  # [2, vocab]
    chain = Draft.chain([0], q=q)
    gen = make_generator(5)
    outcomes = [outcome(accept_sampled(chain, p, gen)) for _ in range(600)]
    assert set(outcomes) <= {((), 1), ((0,), 5)}
    accepted = sum(o == ((0,), 5) for o in outcomes)
    # binomial(600, 1/6): mean 100, sd 9.1; [55, 145] is +-5 sd, so a correct rule fails this ~1 time in 10^6
    assert 55 <= accepted <= 145


def test_sampling_deterministic_tree_descends_into_sampled_child():
    # p at the root is one-hot at 5 -> the draw y = 5 is n1's token, descend; at n1 p is one-hot at 1 -> n2;
    # at n2 p puts all its mass on 0, which is no child of n2 (its only child n5 carries 3): emit 0 and stop
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    p = one_hot_rows([5, 4, 1, 0, 0, 0, 2])
    assert accept_sampled(draft, p, make_generator(6)) == Acceptance([1, 2], 0)


def test_sampling_deterministic_tree_reaches_every_branch():
    # p at the root gives 1/4 to each of the children tokens 2, 5, 0 and to token 3 (no child); rows below are
    # one-hot on tokens with no child, so each step ends one level down: the first emitted token is y ~ p_root.
    # All four outcomes must appear in 400 draws (each is missed with probability (3/4)^400).
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    p = torch.cat([dist(.25, 0., .25, .25, 0., .25)[None], one_hot_rows([3] * 6)])  # [7, vocab]
    gen = make_generator(7)
    seen = {outcome(accept_sampled(draft, p, gen)) for _ in range(400)}
    # n0 (2) -> its row is one-hot at 3, not n3's token 4: stop with bonus 3; n1 (5) -> 3 is not n2's token 1;
    # n4 (0) is a leaf; token 3 at the root has no child
    assert seen == {((0,), 3), ((1,), 3), ((4,), 3), ((), 3)}


def test_seeded_generator_reproduces_results():
    # the rule draws all its randomness from the generator: the same seed gives the same sequence of outcomes
    q = torch.stack([dist(.3, .2, .1, .1, .2, .1), dist(.1, .1, .1, .1, .1, .5)])  # [2, vocab]
    p = torch.stack([dist(.2, .2, .2, .2, .1, .1), dist(.1, .3, .1, .1, .3, .1), dist(.5, .1, .1, .1, .1, .1)])
    chain = Draft.chain([0, 5], q=q)

    def run(seed: int) -> list[Acceptance]:
        gen = make_generator(seed)
        return [accept_sampled(chain, p, gen) for _ in range(50)]

    assert run(11) == run(11)
    assert run(11) != run(12)  # 50 draws of a spread law: two seeds agreeing everywhere is astronomically unlikely


# ---------------------------------------------------------------- accept(): warping and dispatch


def test_accept_greedy_config_uses_argmax():
    # temperature 0 is greedy: accept() must give accept_greedy's answer on raw logits
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    logits = argmax_rows([5, 4, 1, 3, 0, 0, 2])
    assert accept(draft, logits, SamplingConfig(), make_generator(0)) == Acceptance([1, 2, 5], 2)


def test_accept_top_k_one_is_greedy():
    # top_k = 1 keeps only the argmax, so warping makes p one-hot and sampling reproduces greedy at any temperature
    draft = Draft.tree(TREE_TOKENS, TREE_PARENTS)
    logits = argmax_rows([2, 4, 0, 0, 1, 0, 0])
    config = SamplingConfig(temperature=1.5, top_k=1)
    gen = make_generator(8)
    for _ in range(20):
        assert accept(draft, logits, config, gen) == Acceptance([0, 3], 1)


def test_accept_warps_before_sampling():
    # logits are 0 at tokens 0 and 1 and -inf elsewhere, so the warped p is (.5, .5, 0, 0, 0, 0): a draft of token 2
    # (p(2) = 0) is never accepted and the bonus is 0 or 1, both of which must show up
    logits = torch.full((2, VOCAB), float("-inf"))
    logits[:, :2] = 0.0
    config = SamplingConfig(temperature=1.0)
    assert torch.allclose(warp(logits, config)[0], dist(.5, .5, 0., 0., 0., 0.))
    gen = make_generator(9)
    bonuses = {accept(Draft.chain([2]), logits, config, gen).bonus for _ in range(100)}
    assert bonuses == {0, 1}  # both halves of p show up in 100 draws (missed with probability 2 * 2^-100)
