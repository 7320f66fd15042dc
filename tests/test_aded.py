"""ADED: the adaptive tri-gram table (rule, build, save/load, memory) and the MCTS tree drafter, on literal token
lists; one end-to-end learning test on a tiny model; the build-trigrams command on a small corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from leapdecode.decode import GenerationConfig, speculate
from leapdecode.drafters.aded import ADED
from leapdecode.drafters.base import Draft, StepResult
from leapdecode.drafters.trigram import PROBES, TrigramTable
from leapdecode.models.hf import HFRunner
from leapdecode.models.tiny import tiny_model
from leapdecode.stats import Stats

# ---------------------------------------------------------------- the adaptation rule


def test_weights_grow_with_occurrences_then_cap():
    table = TrigramTable(top_k=3, cap=4.0)
    for _ in range(3):
        table.add(1, 2, 3)
    assert table.row(1, 2) == [(3, 3.0)]  # one unit of weight per occurrence
    table.add(1, 2, 3)
    table.add(1, 2, 3)
    assert table.row(1, 2) == [(3, 4.0)]  # 5 occurrences, but a row's total never exceeds cap = 4
    table.add(1, 2, 7)
    # 7 joins with weight 1; the total 4 + 1 = 5 is scaled back to 4: 3 -> 4 * 4/5 = 3.2, 7 -> 1 * 4/5 = 0.8
    (t1, w1), (t2, w2) = table.row(1, 2)
    assert (t1, t2) == (3, 7)
    assert w1 == pytest.approx(3.2, rel=1e-3) and w2 == pytest.approx(0.8, rel=1e-3)  # float16 storage


def test_full_row_replaces_its_weakest_successor():
    table = TrigramTable(top_k=2, cap=16.0)
    for token, times in ((3, 2), (5, 1)):
        for _ in range(times):
            table.add(1, 2, token)
    table.add(1, 2, 9)
    # the row holds 2 successors; 5 (weight 1) is weaker than 3 (weight 2), so 9 takes its place with weight 1
    assert table.row(1, 2) == [(3, 2.0), (9, 1.0)]


def test_table_drifts_toward_the_current_text():
    # evidence for 3 at the cap (weight 4), then new text keeps writing 4 after the same pair. Each add of 4 scales
    # the row by r = 4/5, so after k adds w3 = 4 r^k and w4 = 4 (1 - r^k): 4 overtakes 3 once r^k < 1/2, i.e. at
    # k = 4 (r^3 = 0.512, r^4 = 0.41)
    table = TrigramTable(top_k=4, cap=4.0)
    for _ in range(10):
        table.add(1, 2, 3)
    for _ in range(3):
        table.add(1, 2, 4)
    assert table.row(1, 2)[0][0] == 3
    table.add(1, 2, 4)
    assert table.row(1, 2)[0][0] == 4
    assert sum(w for _, w in table.row(1, 2)) == pytest.approx(4.0, rel=1e-3)


def test_successors_mix_in_the_bigram_row():
    table = TrigramTable(top_k=4, cap=16.0)
    table.add(1, 2, 5)  # the pair (1, 2) was followed once by 5
    for token in (5, 6, 6, 6):
        table.add(-1, 2, token)  # the bigram row of 2: 5 once, 6 three times
    # tri-gram weight 1 for 5, plus the bigram row spread as backoff = 1 unit: 5 -> 1/4, 6 -> 3/4; total 2
    assert table.successors(1, 2, backoff=1.0) == [(5, pytest.approx(1.25 / 2)), (6, pytest.approx(0.75 / 2))]
    # an unknown pair falls back to the bigram row alone
    assert table.successors(9, 2) == [(6, pytest.approx(0.75)), (5, pytest.approx(0.25))]
    assert table.successors(9, 8) == []  # nothing known about 8


def test_add_sequence_adds_trigrams_and_bigrams():
    table = TrigramTable()
    table.add_sequence([1, 2, 3, 1, 2, 4])
    # (1, 2) was followed by 3 then by 4; the bigram row of 2 holds the same; (2, 3) by 1
    assert sorted(table.row(1, 2)) == [(3, 1.0), (4, 1.0)]
    assert sorted(table.row(-1, 2)) == [(3, 1.0), (4, 1.0)]
    assert table.row(2, 3) == [(1, 1.0)]
    assert len(table) == 3 + 3  # tri-gram contexts (1,2) (2,3) (3,1); bigram contexts 1, 2, 3


def test_rule_rejects_bad_tokens_and_parameters():
    with pytest.raises(ValueError, match="token ids"):
        TrigramTable().add(1, 2, -5)
    with pytest.raises(ValueError, match="top_k"):
        TrigramTable(top_k=0)
    with pytest.raises(ValueError, match="max_slots"):
        TrigramTable(max_slots=1000)


# ---------------------------------------------------------------- building, saving, memory


def test_from_sequences_counts_within_sequences():
    table = TrigramTable.from_sequences([[1, 2, 3, 1, 2, 3, 1, 2, 4], [7, 8]], top_k=2, cap=2.0)
    # (1, 2) -> 3 twice, 4 once: total 3 > cap 2, so scaled by 2/3 to 4/3 and 2/3
    (t1, w1), (t2, w2) = table.row(1, 2)
    assert (t1, t2) == (3, 4) and w1 == pytest.approx(4 / 3, rel=1e-3) and w2 == pytest.approx(2 / 3, rel=1e-3)
    assert table.row(2, 3) == [(1, 2.0)]
    assert table.row(-1, 7) == [(8, 1.0)]
    assert table.row(4, 7) == [] and table.row(-1, 4) == []  # no gram across the two sequences
    top1 = TrigramTable.from_sequences([[1, 2, 3, 1, 2, 3, 1, 2, 4]], top_k=1)
    assert top1.row(1, 2) == [(3, 2.0)]  # only the most frequent successor is kept
    assert TrigramTable.from_sequences([[1, 2, 3, 1, 2, 4]], min_count=2).row(1, 2) == []  # each seen once


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    table = TrigramTable.from_sequences([rng.integers(0, 300, 5000)], top_k=4, cap=8.0)
    table.add(17, 18, 19, 3.0)  # an online update is saved too
    path = tmp_path / "table.npz"
    table.save(path)
    loaded = TrigramTable.load(path)
    assert (loaded.top_k, loaded.cap, len(loaded)) == (table.top_k, table.cap, len(table))
    seq = rng.integers(0, 300, 200).tolist()
    for a, b in zip(seq, seq[1:]):
        assert loaded.row(a, b) == table.row(a, b) and loaded.row(-1, b) == table.row(-1, b)
    assert loaded.row(17, 18) == [(19, 3.0)]
    assert ADED(table=str(path)).table.row(17, 18) == [(19, 3.0)]  # the drafter option loads it


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-trigrams"):
        TrigramTable.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    other.write_bytes(b"not a table")
    with pytest.raises(ValueError, match="not a tri-gram table"):
        TrigramTable.load(other)


def test_memory_bound_at_50k_vocabulary_scale():
    # 450k distinct contexts (400k random token pairs over a 50k vocabulary and ~50k single tokens) fill the table
    # to its default maximum of 2**20 slots: 8 + 8 * 4 + 8 * 2 = 56 bytes a slot, 56 MiB, under the 64 MiB target
    rng = np.random.default_rng(1)
    table = TrigramTable.from_sequences([rng.integers(0, 50_000, 400_000)])
    # (a context whose whole 32-slot probe window is taken is left out: a handful at most at this load)
    assert table.slots == 1 << 20 and table.dropped <= 10 and len(table) > 400_000
    assert table.state_bytes() < 64 * 2**20
    assert table.state_bytes() >= table.keys.nbytes + table.succ.nbytes + table.weights.nbytes  # honest count
    before = table.state_bytes()
    for a, b, c in rng.integers(0, 50_000, (2000, 3)).tolist():  # online learning at the size limit
        table.add(a, b, c)
    assert table.state_bytes() == before and table.row(a, b) == [(c, 1.0)]


def test_full_table_forgets_the_lightest_contexts():
    table = TrigramTable(max_slots=64, initial_slots=16)
    for _ in range(8):
        table.add(1000, 1001, 5)  # a heavy context (weight 8)
    for i in range(500):
        table.add(i, i + 1, 7)  # light ones (weight 1), far more than 64 slots hold
    assert table.slots == 64 and len(table) <= 64
    assert table.row(1000, 1001) == [(5, 8.0)]  # every probe window it sits in had lighter rows to evict
    assert table.row(499, 500) == [(7, 1.0)]  # a new context always finds a slot
    assert PROBES <= 64


# ---------------------------------------------------------------- the search


def literal_drafter(**options) -> ADED:
    """A drafter whose table says: after (1, 2) comes 3 (3 times) or 4 (once); after (2, 3) comes 5."""
    drafter = ADED(**options)
    for _ in range(3):
        drafter.table.add_sequence([1, 2, 3, 5])
    drafter.table.add_sequence([1, 2, 4])
    return drafter


def test_search_takes_the_likely_branch_first():
    drafter = literal_drafter()
    # successors of (1, 2): 3 with p = 0.75, 4 with 0.25 (bigram row of 2 agrees). The first simulation expands
    # the likelier, 3; its rollout follows 5 (certain) and stops, value 0.75 * (1 + 1) = 1.5. The second compares
    # descending into 3 (Q = 1.5 / 1 + 0.75 * sqrt(1) / 2 = 1.875) with expanding 4 (0.25 + 0.25 * 1 = 0.5):
    # it descends and expands 3's only successor, 5
    assert drafter.search(1, 2, 1) == ([3], [-1])
    assert drafter.search(1, 2, 2) == ([3, 5], [-1, 0])
    tokens, parents = drafter.search(1, 2, 3)
    assert sorted(zip(tokens, parents)) == [(3, -1), (4, -1), (5, 0)]  # then 4 beside 3: nothing else is known
    assert drafter.search(1, 2, 64) == (tokens, parents)  # the table knows only these three nodes


def test_min_prob_prunes_unlikely_nodes():
    # 4 (p = 0.25) is below min_prob = 0.3, so only the 3 -> 5 branch (reach 0.75 then 0.75) is drafted
    assert literal_drafter(min_prob=0.3).search(1, 2, 64) == ([3, 5], [-1, 0])


def random_table_drafter(seed: int, **options) -> ADED:
    """A drafter over a table of random text on 12 tokens: every pair has several successors."""
    drafter = ADED(seed=seed, min_prob=0.0, **options)
    drafter.table.add_sequence(np.random.default_rng(3).integers(0, 12, 3000).tolist())
    return drafter


def contexts(count: int = 20) -> list[tuple[int, int]]:
    rng = np.random.default_rng(4)
    return [tuple(pair) for pair in rng.integers(0, 12, (count, 2)).tolist()]


def test_search_is_deterministic_under_a_seed():
    first, second = random_table_drafter(seed=7), random_table_drafter(seed=7)
    for a, b in contexts():
        assert first.search(a, b, 24) == second.search(a, b, 24)
    # the rollouts are what the seed drives: other seeds give other trees, and without rollouts every seed agrees
    trees = {tuple(map(tuple, random_table_drafter(seed=s).search(3, 4, 24))) for s in range(8)}
    assert len(trees) > 1
    flat = {tuple(map(tuple, random_table_drafter(seed=s, rollout_depth=0).search(3, 4, 24))) for s in range(8)}
    assert len(flat) == 1


def test_reset_reseeds_the_rollouts():
    drafter = random_table_drafter(seed=1)
    drafter.reset([3, 4])
    first = [drafter.propose([3, 4, a, b], 24).tokens.tolist() for a, b in contexts(5)]
    drafter.table = random_table_drafter(seed=1).table  # the same table again (reset added the prompt's grams)
    drafter.reset([3, 4])
    assert [drafter.propose([3, 4, a, b], 24).tokens.tolist() for a, b in contexts(5)] == first


@pytest.mark.parametrize("budget", [1, 3, 16, 64])
def test_search_builds_valid_trees(budget):
    drafter = random_table_drafter(seed=0)
    for a, b in contexts():
        tokens, parents = drafter.search(a, b, budget)
        assert 1 <= len(tokens) <= budget and len(parents) == len(tokens)
        assert all(-1 <= p < i for i, p in enumerate(parents))  # parents precede children
        siblings = [(p, t) for p, t in zip(parents, tokens)]
        assert len(set(siblings)) == len(siblings)  # no two children of one node carry the same token
        draft = drafter.propose([a, b], budget)  # the Draft constructor checks the same invariants
        assert draft.n <= budget and draft.q is None


def test_budget_zero_and_unknown_context_give_empty_drafts():
    drafter = literal_drafter()
    assert drafter.propose([1, 2], 0).n == 0
    assert drafter.propose([40, 41], 64).n == 0  # nothing known after 41


# ---------------------------------------------------------------- learning from the target


def test_empty_table_learns_from_a_step():
    drafter = ADED(learn_top_k=2, target_weight=2.0, min_prob=0.1)
    drafter.reset([7])
    draft = drafter.propose([7], 8)
    assert draft.n == 0  # an empty table drafts nothing
    logits = torch.full((1, 16), -10.0)
    logits[0, 8], logits[0, 11] = 5.0, 5.0 - float(np.log(3.0))  # the target: 8 three times likelier than 11
    drafter.observe(StepResult(root=7, draft=draft, logits=logits, path=[], bonus=8, emitted=[8]))
    # the emitted bigram 7 -> 8 has weight 1 + 2 * p(8) = 1 + 2 * 0.75; the runner-up 11 gets 2 * 0.25
    assert drafter.table.row(-1, 7) == [(8, pytest.approx(2.5, rel=1e-3)), (11, pytest.approx(0.5, rel=1e-3))]
    # the unknown pair (5, 7) backs off to the bigram row of 7: 8 (p = 5/6), then 11 (p = 1/6, above min_prob)
    assert drafter.propose([5, 7], 8).tokens.tolist() == [8, 11]


def test_emitted_trigrams_are_learned_along_the_path():
    drafter = literal_drafter(learn_top_k=0)
    draft = drafter.propose([9, 1, 2], 2)  # [3, 5]
    assert draft.tokens.tolist() == [3, 5]
    # the target accepted 3, rejected 5 and said 6: the tri-grams (1, 2) -> 3 and (2, 3) -> 6 are evidence
    drafter.observe(StepResult(root=2, draft=draft, logits=torch.zeros(3, 16), path=[0], bonus=6, emitted=[3, 6]))
    assert dict(drafter.table.row(2, 3)) == {5: 3.0, 6: 1.0}
    assert dict(drafter.table.row(1, 2))[3] == 4.0


def test_drafter_learns_online_on_a_tiny_model():
    # a fresh drafter and a random-weight target: the first request teaches the table the target's continuation,
    # so repeating the request drafts it back and accepts several tokens per step; outputs stay plain greedy
    model = tiny_model("llama", vocab_size=64, seed=3)
    runner = HFRunner(model.hf_model)
    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    prompt = [5, 17, 33, 2, 9]
    plain = [t for step in speculate(runner, prompt, None, config) for t in step]
    drafter = ADED()
    mats = []
    for _ in range(2):
        stats = Stats()
        out = [t for step in speculate(runner, prompt, drafter, config, stats=stats) for t in step]
        assert out == plain
        mats.append(stats.mat)
    assert mats[1] > 2.0 and mats[1] > mats[0], mats
    assert stats.extra["aded_table_contexts"] > 0 and stats.extra["aded_propose_ms_per_step"] > 0


def test_options_are_validated():
    for bad in (dict(nodes=-1), dict(simulations=0), dict(exploration=-1.0), dict(min_prob=2.0),
                dict(rollout_depth=1.5), dict(table=3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ADED(**bad)


# ---------------------------------------------------------------- build-trigrams


def cli_app() -> typer.Typer:
    from leapdecode.trigram_cli import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, so the command is invoked by its name as under `leapdecode`
        pass

    register(app)
    return app


@pytest.mark.real
def test_build_trigrams_command(tmp_path, smollm2):
    text = "The cat sat on the mat. The cat sat on the hat.\n"
    (tmp_path / "a.txt").write_text(text * 3)
    (tmp_path / "b.txt").write_text("The dog ran in the park.\n")
    out = tmp_path / "table.npz"
    result = CliRunner().invoke(cli_app(), ["build-trigrams", "--corpus", str(tmp_path / "a.txt"),
                                            str(tmp_path / "b.txt"), "--out", str(out), "--top-k", "4",
                                            "--no-progress"])
    assert result.exit_code == 0, result.output
    table = TrigramTable.load(out)
    ids = smollm2.tokenizer("The cat sat on the", add_special_tokens=False)["input_ids"]
    # in a.txt, "... on the" is followed by " mat" 3 times and " hat" 3 times; counted with the model's tokenizer
    following = {smollm2.tokenizer.decode([t]) for t, _ in table.row(ids[-2], ids[-1])}
    assert following == {" mat", " hat"}
    dog = smollm2.tokenizer(" dog ran", add_special_tokens=False)["input_ids"]
    assert table.row(-1, dog[0])[0][0] == dog[1]  # b.txt was counted too
    assert table.top_k == 4


def test_build_trigrams_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli_app(), ["build-trigrams", "--corpus", str(tmp_path / "nope.txt"),
                                        "--out", str(tmp_path / "t.npz")])
    assert missing.exit_code == 2 and "not found" in missing.output
    none = runner.invoke(cli_app(), ["build-trigrams", "--out", str(tmp_path / "t.npz")])
    assert none.exit_code == 2 and "no corpus" in none.output


def test_leapdecode_command_has_build_trigrams():
    # the installed CLI registers the command (leapdecode.cli._register_subcommands)
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "from leapdecode.cli import main; main()", "build-trigrams",
                             "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--corpus" in result.stdout and "--top-k" in result.stdout


@pytest.mark.real
def test_real_model_output_is_plain_greedy(smollm2):
    # lossless on the real model: the same tokens as plain decoding; the summary reuses the text's phrases, which
    # the prompt's tri-grams put in the table, so drafts are accepted (MAT above plain's 1.00)
    runner = HFRunner(smollm2.hf_model)
    config = GenerationConfig(max_new_tokens=40)
    drafter = ADED()
    prompts = ["Summarize in one sentence: The city council met on Tuesday to discuss the new park. The park will "
               "have a playground, a pond and a small library, and it will open next spring.",
               "Write a Python function that returns the n-th Fibonacci number."]
    for text in prompts:
        prompt = smollm2.encode(text)
        plain = [t for step in speculate(runner, prompt, None, config, smollm2.eos_token_ids) for t in step]
        stats = Stats()
        out = [t for step in speculate(runner, prompt, drafter, config, smollm2.eos_token_ids, stats) for t in step]
        assert out == plain
        assert stats.mat > 1.0
