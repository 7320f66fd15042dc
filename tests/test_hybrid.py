"""The hybrid drafter on literal contexts and tables: trie merge, chain statistics, node selection, budget."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from leapdecode.budget import LatencyCurve
from leapdecode.drafters.base import StepResult
from leapdecode.drafters.chain_stats import (PRIOR_STEPS, chain_counts, chain_prior, chain_walk, flat_prior,
                                             read_chain_counts, write_chain_counts)
from leapdecode.drafters.hybrid import ChainStats, Hybrid, merge_chain_and_tree
from leapdecode.drafters.recycling import RecyclingTable
from leapdecode.tree import children


def hybrid_with_rows(rows: dict[int, list[int]], vocab: int = 20, **kwargs) -> Hybrid:
    drafter = Hybrid(top_k=3, template="0;1;2;0,0;0,1;1,0;0,0,0", vocab_size=vocab, **kwargs)
    table = RecyclingTable(top_k=3, vocab_size=vocab)
    for token, row in rows.items():
        table.table[token] = row
    drafter.recycling.table = table
    return drafter


def assert_distinct_siblings(tokens, parents):
    for kids in children(parents).values():
        assert len({tokens[k] for k in kids}) == len(kids)


# ---------------------------------------------------------------- trie merge


def test_merge_reuses_common_prefixes():
    # chain 5 6 7; tree: 5 (root child), 9 (root child), 6 under the tree's 5, 8 under the tree's 5.
    # The tree's 5 is the chain's first node, its 6 the chain's second: both reused; 9 and 8 are new nodes
    tokens, parents, chain_nodes, origin = merge_chain_and_tree([5, 6, 7], [5, 9, 6, 8], [-1, -1, 0, 0], limit=10)
    assert tokens == [5, 6, 7, 9, 8] and parents == [-1, 0, 1, -1, 0]
    assert chain_nodes == [0, 1, 2] and origin == [0, 3, 1, 4]


def test_merge_respects_the_limit():
    # room for 4 nodes: the chain takes 3, the tree's 9 takes the last; 8 finds no room, nor does its child 2
    tokens, parents, _, origin = merge_chain_and_tree([5, 6, 7], [5, 9, 8, 2], [-1, -1, 0, 2], limit=4)
    assert tokens == [5, 6, 7, 9] and parents == [-1, 0, 1, -1]
    assert origin == [0, 3, -1, -1]
    # a limit below the chain's length cuts the chain
    assert merge_chain_and_tree([5, 6, 7], [], [], limit=2)[0] == [5, 6]


def test_merge_keeps_siblings_distinct_on_random_inputs():
    rng = random.Random(0)
    for _ in range(200):
        chain = [rng.randrange(6) for _ in range(rng.randrange(6))]
        n = rng.randrange(12)
        parents = [rng.randrange(-1, i) for i in range(n)]
        tokens = []
        for i, p in enumerate(parents):  # the tree itself has distinct siblings, as a recycling tree does
            used = {tokens[j] for j in range(i) if parents[j] == p}
            tokens.append(rng.choice([t for t in range(12) if t not in used]))
        merged, merged_parents, _, _ = merge_chain_and_tree(chain, tokens, parents, limit=rng.randrange(1, 20))
        assert all(p < i for i, p in enumerate(merged_parents))
        assert_distinct_siblings(merged, merged_parents)


# ---------------------------------------------------------------- chain statistics


def test_chain_stats_censoring():
    stats = ChainStats(max_ngram=2, max_chain=4)
    # the chain disagrees with the emitted tokens at depth 3: depths 1-2 right, 3 tried and wrong; depth 4 was
    # never tried (its conditional rate is about chains right up to depth 3)
    stats.record(2, [1, 2, 3, 4], [1, 2, 9])
    assert stats.at_risk[2].tolist() == [1, 1, 1, 0] and stats.survived[2].tolist() == [1, 1, 0, 0]
    # the chain agrees with both emitted tokens: depths 3-4 are unknown, not counted as failures
    stats.record(2, [1, 2, 3, 4], [1, 2])
    assert stats.at_risk[2].tolist() == [2, 2, 1, 0] and stats.survived[2].tolist() == [2, 2, 0, 0]
    # probabilities are products of per-depth rates: non-increasing, and below the prior after the failure
    p = stats.probs(2)
    assert all(a >= b for a, b in zip(p, p[1:])) and p[2] < p[1]


def test_chain_stats_learn_reliable_long_matches():
    stats = ChainStats(max_ngram=4, max_chain=8)
    for _ in range(200):  # 4-gram matches always right for 8 tokens; 1-gram matches always wrong at once
        stats.record(4, list(range(8)), list(range(8)) + [99])
        stats.record(1, list(range(8)), [99])
    # each 4-gram rate is (200 + 16 * 0.7) / (200 + 16) ~ .978 (the prior weighs 16 steps): .978^8 ~ .84;
    # the 1-gram rate at depth 1 is (0 + 16 * .3) / 216 ~ .022
    assert stats.probs(4)[7] == pytest.approx(((200 + 16 * 0.7) / 216) ** 8)
    assert stats.probs(4)[7] > 0.8 and stats.probs(1)[0] < 0.03


def test_chain_stats_follow_a_spell_of_copying():
    # long-run evidence: 4-gram chains are wrong at once; then the request starts quoting its prompt and the chain
    # is right for 8 tokens at each of 10 steps. The long-run rate alone hardly moves (10 of 210 steps); pooled
    # with the decayed recent evidence the chain is worth drafting deep, until the next request
    spell = ChainStats(max_ngram=4, max_chain=8, memory=0.9)
    steady = ChainStats(max_ngram=4, max_chain=8, memory=0.0)
    for stats in (spell, steady):
        for _ in range(200):
            stats.record(4, list(range(8)), [99])
        for _ in range(10):
            stats.record(4, list(range(8)), list(range(8)) + [99])
    assert steady.probs(4)[3] < 0.1  # depth 1: (10 + 16 * .7) / 226 ~ .09
    recent = spell.recent_survived / spell.recent_at_risk  # the failures before the spell have faded
    assert recent > 0.9
    assert spell.probs(4)[3] > 0.5 and spell.probs(4)[7] > 0.3
    assert all(a >= b for a, b in zip(spell.probs(4), spell.probs(4)[1:]))
    spell.new_request()
    assert spell.probs(4)[3] == pytest.approx(steady.probs(4)[3])  # the long-run rates stay


def test_chain_stats_recent_evidence_counts_tried_positions_only():
    stats = ChainStats(max_ngram=2, max_chain=6, memory=0.5)
    stats.record(2, [1, 2, 3, 4], [1, 2, 9])  # right, right, wrong: 3 positions tried, 2 right
    assert (stats.recent_at_risk, stats.recent_survived) == (3, 2)
    stats.record(2, [1, 2, 3, 4], [1])  # agreed with the one emitted token, the rest unknown: 1 tried, 1 right
    assert (stats.recent_at_risk, stats.recent_survived) == (0.5 * 3 + 1, 0.5 * 2 + 1)


def test_chain_counts_count_each_answer_position_as_a_decoding_step():
    # prompt 1 2 3 4, answer 1 2 3 9. Before answer token 0 the context ends in 4, seen nowhere earlier: no chain.
    # Before token 1 (context ...4 1): the 1-gram "1" matched at the start, chain 2 3 4 1 against 2 3 9: right
    # twice, wrong at depth 3. Before token 2 (...1 2): 2-gram, chain 3 4 1 2 against 3 9: right once, then wrong.
    # Before token 3 (...1 2 3): 3-gram, chain 4 1 2 3 against 9: wrong at once.
    at_risk, survived = chain_counts([([1, 2, 3, 4], [1, 2, 3, 9])], max_ngram=4, max_chain=4)
    assert at_risk.tolist() == [[0] * 4, [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0] * 4]
    assert survived.tolist() == [[0] * 4, [1, 1, 0, 0], [1, 0, 0, 0], [0] * 4, [0] * 4]
    # the same counts as a decoding loop's ChainStats.record with the answer's next tokens as the emitted ones
    stats = ChainStats(max_ngram=4, max_chain=4)
    stats.record(1, [2, 3, 4, 1], [2, 3, 9])
    stats.record(2, [3, 4, 1, 2], [3, 9])
    stats.record(3, [4, 1, 2, 3], [9])
    assert (stats.at_risk == at_risk).all() and (stats.survived == survived).all()


def test_chain_walk_decodes_with_the_chain_alone():
    # prompt 1 2 3 4, answer 1 2 3 9 (the example above). Step 1: no match, emits "1". Step 2: the 1-gram "1"
    # matches; the chain 2 3 (cut to the 2 tokens before the answer's last) is right twice: with both nodes
    # drafted the step emits 2 3 and the bonus 9
    pairs = [([1, 2, 3, 4], [1, 2, 3, 9])]
    oracle = chain_walk(pairs, np.zeros((5, 4)), price=0.5, oracle=True, max_chain=4)
    assert (oracle.steps, oracle.tokens, oracle.rows, oracle.accepted, oracle.drafted) == (2, 4, 2, 2, 1)
    assert oracle.speedup == pytest.approx(4 / (2 + 0.5 * 2))
    likely, unlikely = np.full((5, 4), 0.9), np.full((5, 4), 0.3)
    # a chain likely right is drafted in full at that price: (1 + .9 + .9) / (1 + 2 x .5) beats 1 and 1.9 / 1.5
    assert chain_walk(pairs, likely, price=0.5, max_chain=4) == oracle
    # one that is not is never drafted: plain decoding, one step per token
    plain = chain_walk(pairs, unlikely, price=0.5, max_chain=4)
    assert (plain.steps, plain.tokens, plain.rows, plain.drafted, plain.speedup) == (4, 4, 0, 0, 1.0)
    # at price 0 every candidate node is worth its row; the walk drafts the chain wherever there is one
    free = chain_walk(pairs, unlikely, price=0.0, max_chain=4)
    assert (free.steps, free.tokens, free.rows) == (2, 4, 2) and free.speedup == 2.0
    # an answer that repeats its prompt: the chain is right to the end, every answer token is emitted once
    copied = chain_walk([([1, 2, 3, 4], [1, 2, 3, 4, 1, 2])], likely, price=0.1, oracle=True, max_chain=4)
    assert copied.tokens == 6 and copied.steps == 2 and copied.accepted == 4
    # at a price of 1 a right token costs what it brings: even the oracle drafts nothing
    assert chain_walk(pairs, likely, price=1.0, oracle=True, max_chain=4).rows == 0
    with pytest.raises(ValueError, match="price"):
        chain_walk(pairs, likely, price=-0.1)
    with pytest.raises(ValueError, match="probs"):
        chain_walk(pairs, np.zeros((3, 4)), price=0.5, max_chain=4)


def test_chain_counts_round_trip_and_bad_files(tmp_path):
    at_risk, survived = chain_counts([([5, 6, 7, 5, 6], [7, 5, 6, 7, 8])], max_ngram=3, max_chain=5)
    path = tmp_path / "chains.json"
    write_chain_counts(path, at_risk, survived, source="a test")
    again = read_chain_counts(path)
    assert (again[0] == at_risk).all() and (again[1] == survived).all()
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match="chain counts"):
            read_chain_counts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        Hybrid(chain_prior=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="chain_prior"):
        Hybrid(chain_prior=3)


def test_chain_prior_smooths_counts_and_reaches_past_them():
    at_risk = [[0, 0], [100, 0], [100, 50]]  # counted for n <= 2 and depths 1-2 only
    survived = [[0, 0], [20, 0], [90, 40]]
    prior = chain_prior(torch.tensor(at_risk).numpy(), torch.tensor(survived).numpy(), max_ngram=4, max_chain=3)
    flat = flat_prior(4, 3)
    assert prior[1, 0] == pytest.approx((20 + PRIOR_STEPS * flat[1, 0]) / (100 + PRIOR_STEPS))
    assert prior[1, 1] == pytest.approx(flat[1, 1])  # never counted: the built-in guess
    assert prior[2, 1] == pytest.approx((40 + PRIOR_STEPS * flat[2, 1]) / (50 + PRIOR_STEPS))
    assert prior[2, 2] == pytest.approx((40 + PRIOR_STEPS * flat[2, 2]) / (50 + PRIOR_STEPS))  # deepest counted
    assert prior[4, 0] == pytest.approx((90 + PRIOR_STEPS * flat[4, 0]) / (100 + PRIOR_STEPS))  # longest counted


def test_hybrid_starts_its_chain_rates_from_the_counts_it_is_given(tmp_path):
    path = tmp_path / "chains.json"
    at_risk, survived = torch.zeros(5, 8).numpy(), torch.zeros(5, 8).numpy()
    at_risk[4], survived[4] = 1000, 950  # 4-gram chains right 95 % of the time at every depth
    write_chain_counts(path, at_risk, survived, source="a test")
    measured, built_in = Hybrid(chain_prior=str(path)), Hybrid(chain_prior="")
    assert measured.chain_stats.probs(4)[1] == pytest.approx(((950 + PRIOR_STEPS * 0.7) / (1000 + PRIOR_STEPS)) ** 2)
    assert built_in.chain_stats.probs(4)[1] == pytest.approx(0.7 ** 2)
    assert measured.fork().chain_stats.probs(4)[1] == measured.chain_stats.probs(4)[1]


@pytest.mark.parametrize("memory", [-0.1, 1.0, "x", True])
def test_hybrid_rejects_a_bad_chain_memory(memory):
    with pytest.raises(ValueError, match="chain_memory"):
        Hybrid(chain_memory=memory)


# ---------------------------------------------------------------- drafts


ROWS = {6: [7, 9, 10], 7: [11, 8, 12]}  # token 6 -> 7 9 10; token 7 -> 11 8 12


def test_chain_and_tree_share_nodes():
    # context ... 5 6 7 8 | 5 6: the suffix "5 6" occurred before, so the chain copies 7 8 5 6 ...
    # ranking with the priors: chain depth 1 (.45), template (0,) (.42), chain depth 2 (.2), template (0, 0)
    # (.18): 4 nodes. Template (0,) is row 6's entry 0 = 7, the chain's first token: merged, which frees a slot
    # for the next template node, (1,) (.10) = row 6's entry 1 = 9. (0, 0) is row 7's entry 0 = 11, a new child
    # of the shared node 7 beside the chain's 8. Template nodes come after the chain, in template order
    drafter = hybrid_with_rows(ROWS, tree_budget=4)
    draft = drafter.propose([5, 6, 7, 8, 5, 6], budget=64)
    assert draft.tokens.tolist() == [7, 8, 9, 11] and draft.parents.tolist() == [-1, 0, -1, 0]
    assert draft.q is None


def test_no_match_leaves_the_recycling_tree():
    # no earlier occurrence of the root 6: the template alone, its best 4 nodes (0,) (0,0) (1,) (0,0,0);
    # (0,0,0) would follow row 11, which is empty, so 3 nodes
    drafter = hybrid_with_rows(ROWS, tree_budget=4)
    draft = drafter.propose([1, 2, 6], budget=64)
    assert draft.tokens.tolist() == [7, 9, 11] and draft.parents.tolist() == [-1, -1, 0]


def test_observe_feeds_both_parts():
    drafter = hybrid_with_rows(ROWS, tree_budget=4)
    context = [5, 6, 7, 8, 5, 6]
    draft = drafter.propose(context, budget=64)  # tokens [7, 8, 9, 11], parents [-1, 0, -1, 0]
    logits = torch.zeros(draft.n + 1, 20)
    logits[0, 7] = logits[1, 8] = logits[2, 3] = 1.0  # the target goes 7 8 then 3
    step = StepResult(6, draft, logits, path=[0, 1], bonus=3, emitted=[7, 8, 3])
    drafter.observe(step)
    # the chain 7 8 5 6 ... agreed for 2 tokens then met 3: depths 1-2 right, depth 3 tried and wrong
    assert drafter.chain_stats.survived[2, :4].tolist() == [1, 1, 0, 0]
    assert drafter.chain_stats.at_risk[2, :4].tolist() == [1, 1, 1, 0]
    # the table learned the rows of the verified tokens (6 at the root, 7, 8, 9, 11), and the template counted
    # its three selected nodes, of which (0,) (the shared 7) was accepted
    table = drafter.recycling.table.table
    assert table[8, 0] == 3 and table[6, 0] == 7
    template = drafter.recycling.template
    assert template.trials.sum() == 3 and template.hits.tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_reset_keeps_what_was_learned():
    drafter = hybrid_with_rows(ROWS, tree_budget=4)
    drafter.propose([5, 6, 7, 8, 5, 6], budget=64)
    drafter.chain_stats.record(2, [1], [1, 2])
    drafter.reset([1, 2, 6])
    # a new request: the copy index holds only the new prompt (no match for 6), the table is still there
    assert drafter.propose([1, 2, 6], budget=64).tokens.tolist() == [7, 9, 11]
    assert drafter.chain_stats.at_risk.sum() == 1


def test_auto_size_buys_a_long_reliable_chain():
    # every node costs 10% of a plain step; a chain of a 4-gram match that was always right for 16 tokens is
    # worth almost a token per node, the recycling nodes (<= .42) much less
    curve = LatencyCurve((0, 64), (0.010, 0.074))
    drafter = hybrid_with_rows(ROWS, latency_curve=curve, max_chain=16)
    for _ in range(300):
        drafter.chain_stats.record(4, list(range(16)), list(range(16)) + [99])
    looping = [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3 + [1, 2, 3, 4]  # suffix 1 2 3 4 occurred before: 4-gram match
    with_chain = drafter.propose(looping, budget=64)
    without = drafter.propose([1, 2, 6], budget=64)
    assert with_chain.n >= 12 and with_chain.tokens.tolist()[:4] == [5, 6, 7, 8]
    assert 1 <= without.n <= 3
    assert_distinct_siblings(with_chain.tokens.tolist(), with_chain.parents.tolist())


def test_acceptance_estimates_rank_the_nodes_it_would_draft():
    # the same ranking as test_chain_and_tree_share_nodes: chain depth 1 (.45), template (0,) (.42), chain depth 2
    # (.2), template (0, 0) (.18), ... most likely first, at most the budget (and a fixed tree_budget)
    drafter = hybrid_with_rows(ROWS)
    estimates = drafter.acceptance_estimates([5, 6, 7, 8, 5, 6], budget=4)
    assert estimates.tolist() == pytest.approx([0.45, 0.42, 0.2, 0.18], abs=0.01)
    assert drafter.acceptance_estimates([5, 6, 7, 8, 5, 6], budget=0).size == 0
    many = drafter.acceptance_estimates([5, 6, 7, 8, 5, 6], budget=64)
    assert len(many) > 4 and all(a >= b for a, b in zip(many, many[1:]))
    no_match = drafter.acceptance_estimates([1, 2, 6], budget=64)  # the template alone
    assert no_match[0] == pytest.approx(0.42, abs=0.01) and len(no_match) < len(many)
    assert len(hybrid_with_rows(ROWS, tree_budget=2).acceptance_estimates([5, 6, 7, 8, 5, 6], budget=64)) == 2
    # asking does not change what it drafts, and what it worked out for one context is not used for another
    assert drafter.propose([5, 6, 7, 8, 5, 6], budget=4).tokens.tolist() == [7, 8, 9, 11]
    drafter.acceptance_estimates([5, 6, 7, 8, 5, 6], budget=4)
    other = [9, 9, 9, 9, 1, 6]  # as long, no earlier occurrence of its suffix: the template alone
    assert drafter.propose(other, budget=4).tokens.tolist() == hybrid_with_rows(ROWS).propose(other, 4).tokens.tolist()
    # estimates for a small budget, then a draft with a larger one: worked out again, as a fresh drafter drafts it
    drafter.acceptance_estimates([5, 6, 7, 8, 5, 6], budget=1)
    assert drafter.propose([5, 6, 7, 8, 5, 6], budget=6).tokens.tolist() == \
        hybrid_with_rows(ROWS).propose([5, 6, 7, 8, 5, 6], budget=6).tokens.tolist()


def test_loop_budget_caps_everything():
    drafter = hybrid_with_rows(ROWS)
    assert drafter.propose([5, 6, 7, 8, 5, 6], budget=2).n == 2
    assert drafter.propose([5, 6, 7, 8, 5, 6], budget=0).n == 0
    with pytest.raises(ValueError, match="max_chain"):
        Hybrid(max_chain=0)


def test_forks_share_learning_but_not_request_state():
    # the server's --share-drafter-state: concurrent requests draft with forks of one drafter
    parent = hybrid_with_rows(ROWS, tree_budget=4)
    a, b = parent.fork(), parent.fork()
    a.reset([5, 6, 7, 8, 5, 6])
    b.reset([1, 2, 6])
    draft = a.propose([5, 6, 7, 8, 5, 6], budget=64)  # a's copy index has the repeat (a chain 7 8 5 6)
    assert draft.tokens.tolist() == [7, 8, 9, 11]
    assert b.propose([1, 2, 6], budget=64).tokens.tolist() == [7, 9, 11]  # b's has none: the template alone
    before = b.chain_stats.probs(2)[0]  # cached in b (the prior for n = 2: .45)
    logits = torch.zeros(draft.n + 1, 20)
    logits[0, 7] = logits[1, 8] = logits[2, 3] = 1.0
    a.observe(StepResult(6, draft, logits, path=[0, 1], bonus=3, emitted=[7, 8, 3]))
    # a's step taught the shared table (row 8 -> 3), template counts and chain statistics, seen by b and parent
    assert b.recycling.table.table[8, 0] == 3 and parent.recycling.template.trials.sum() == 3
    assert b.chain_stats.at_risk[2, :3].tolist() == [1, 1, 1]
    # and b's cache follows a's evidence: depth 1 was right, (1 + 16 x .45) / 17
    assert before == pytest.approx(0.45) and b.chain_stats.probs(2)[0] == pytest.approx((1 + 16 * 0.45) / 17)
    # per-request state stays apart: the copy index, last draft and counters
    assert b.steps == 1 and a.steps == 1 and parent.steps == 0
    assert b.lookup is not a.lookup and b._last_draft is not a._last_draft and parent._last_draft is None
