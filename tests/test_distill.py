"""Distilled drafter tables: the corpus the target writes, its predictions, the tables built from them, the shipped
tables for the default model and the `distill-tables` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from leapdecode.distill import (ON_PASSAGE, PASSAGE, TOPICS, corpus_prompts, generate_corpus, greedy_pairs,
                                target_predictions, with_passages)
from leapdecode.distill_cli import register
from leapdecode.drafters.aded import ADED
from leapdecode.drafters.chain_stats import chain_counts, read_chain_counts
from leapdecode.drafters.hybrid import Hybrid
from leapdecode.drafters.recycling import RecyclingTable, TokenRecycling
from leapdecode.drafters.registry import make_drafter
from leapdecode.drafters.shipped import SHIPPED_DIR, resolve_table, shipped_table, target_fingerprint

QUESTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def test_recycling_table_from_predictions_sums_probability_per_successor():
    # token 3 is seen three times: successors 7 (0.5 + 0.5 = 1.0), 8 (0.3 + 0.2 = 0.5: summed, it passes 9's
    # single 0.4), 9 (0.4), 1 (0.05, dropped at top_k = 3); token 5 once
    tokens = np.array([3, 3, 3, 5])
    top = np.array([[7, 9], [8, 7], [8, 1], [2, 4]])
    probs = np.array([[0.5, 0.4], [0.3, 0.5], [0.2, 0.05], [0.9, 0.1]])
    table = RecyclingTable.from_predictions(tokens, top, probs, vocab_size=10, top_k=3)
    assert table.table[3].tolist() == [7, 8, 9]
    assert table.table[5].tolist() == [2, 4, -1]  # fewer successors than top_k: the rest stay empty
    assert table.filled_rows() == 2 and (table.table[[0, 1, 2, 4, 6, 7, 8, 9]] == -1).all()
    narrow = RecyclingTable.from_predictions(tokens, top, probs, vocab_size=10, top_k=1)
    assert narrow.table[3].tolist() == [7]


def test_recycling_table_from_predictions_round_trips_and_checks_input(tmp_path):
    table = RecyclingTable.from_predictions(np.array([1, 2]), np.array([[2, 3], [1, 0]]),
                                            np.array([[0.6, 0.3], [0.7, 0.2]]), vocab_size=4, top_k=2)
    table.save(tmp_path / "t.pt")
    loaded = RecyclingTable(2, 4)
    loaded.load(tmp_path / "t.pt")  # load() rejects repeated siblings and out-of-range ids: none here
    assert (loaded.table == table.table).all()
    with pytest.raises(ValueError, match="disagree"):
        RecyclingTable.from_predictions(np.array([1]), np.array([[2, 3]]), np.array([[0.5]]), vocab_size=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        RecyclingTable.from_predictions(np.array([1]), np.array([[2, 9]]), np.array([[0.5, 0.1]]), vocab_size=4)


def test_corpus_prompts_are_deterministic_and_not_benchmark_questions():
    passages, prompts = corpus_prompts(seed=0)
    assert (passages, prompts) == corpus_prompts(seed=0)
    assert corpus_prompts(seed=1)[1] != prompts  # the arithmetic varies with the seed
    assert len(set(prompts)) > 0.95 * len(prompts) and len(passages) >= 50
    tasks = with_passages(["First text.", "", "Third text."])
    assert len(tasks) == 2 * len(ON_PASSAGE)  # an empty passage gets no tasks
    assert all("First text." in t or "Third text." in t for t in tasks)
    if QUESTIONS.is_file():  # the benchmark's questions must not leak into the distillation corpus
        turns = {t.strip() for line in QUESTIONS.read_text().splitlines() if line.strip()
                 for t in json.loads(line)["turns"]}
        assert not turns & set(passages + prompts)


@pytest.mark.real
def test_generate_corpus_pads_batches_without_changing_answers(smollm2):
    prompts = ["Name a color.", "Write one sentence about the history of the printing press in Europe."]
    batched = generate_corpus(smollm2, prompts, max_new_tokens=8, batch_size=2)
    alone = [generate_corpus(smollm2, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    for prompt, (prompt_ids, answer) in zip(prompts, batched):
        assert prompt_ids == smollm2.encode(prompt) and 0 < len(answer) <= 8
        assert not set(answer) & set(smollm2.eos_token_ids)


@pytest.mark.real
def test_target_predictions_of_greedy_answers_rank_the_answer_first(smollm2):
    pairs = generate_corpus(smollm2, ["Say hello.", "Count from one to five."], max_new_tokens=6, batch_size=2)
    predictions = target_predictions(smollm2, pairs, top_k=4)
    one_by_one = target_predictions(smollm2, pairs, top_k=4, tokens_per_batch=1)  # one sequence per forward
    assert one_by_one.tokens.tolist() == predictions.tokens.tolist()
    assert one_by_one.top[:, 0].tolist() == predictions.top[:, 0].tolist()
    # one row per answer token: the last prompt token, then every answer token but the last (shortest first)
    pairs = sorted(pairs, key=lambda pa: len(pa[0]) + len(pa[1]))
    expected_tokens = [t for p, a in pairs for t in [p[-1]] + a[:-1]]
    assert predictions.tokens.tolist() == expected_tokens
    # the answers are greedy, so the target's most likely next token is the answer's next token
    assert predictions.top[:, 0].tolist() == [t for _, a in pairs for t in a]
    assert predictions.top.shape == predictions.probs.shape == (len(expected_tokens), 4)
    assert (np.diff(predictions.probs, axis=1) <= 1e-7).all() and (predictions.probs.sum(1) <= 1 + 1e-5).all()


@pytest.mark.real
def test_shipped_tables_are_found_for_the_default_model(smollm2):
    fingerprint = target_fingerprint(smollm2)
    assert (SHIPPED_DIR / fingerprint / "recycling.pt").is_file()
    assert shipped_table(smollm2, "recycling.pt").endswith(f"{fingerprint}/recycling.pt")
    assert shipped_table(smollm2, "nope.npz") == "" and resolve_table("auto", None, "recycling.pt") == ""
    assert resolve_table("/some/path.pt", smollm2, "recycling.pt") == "/some/path.pt"
    hybrid = make_drafter("hybrid", {"tree_budget": "8"}, target=smollm2)
    assert hybrid.recycling.table.filled_rows() > 10_000  # warm from the first request
    empty = make_drafter("hybrid", {"tree_budget": "8", "table_path": ""}, target=smollm2)
    assert empty.recycling.table.filled_rows() == 0
    aded = make_drafter("aded", {}, target=smollm2)
    assert len(aded.table) > 100_000


def test_fingerprint_distinguishes_tokenizers_and_shapes(tiny_models):
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    class Config:
        def __init__(self, hidden, layers):
            self.hidden_size, self.num_hidden_layers = hidden, layers

    class Hf:
        def __init__(self, hidden, layers):
            self.config = Config(hidden, layers)

    class Fake:
        def __init__(self, vocab, hidden=64, layers=2):
            self.hf_model, self.tokenizer, self.vocab_size = Hf(hidden, layers), Tok(vocab), len(vocab)

    a = {f"t{i}": i for i in range(64)}
    b = {f"u{i}": i for i in range(64)}
    assert target_fingerprint(Fake(a)) == target_fingerprint(Fake(dict(a)))
    assert target_fingerprint(Fake(a)) != target_fingerprint(Fake(b))
    assert target_fingerprint(Fake(a)) != target_fingerprint(Fake(a, hidden=128))
    assert target_fingerprint(Fake(a)) != target_fingerprint(Fake(a, layers=3))
    # remembered per loaded model, but never across tokenizers
    hf = Hf(64, 2)
    first, second = Fake(a), Fake(b)
    first.hf_model = second.hf_model = hf
    assert target_fingerprint(first) != target_fingerprint(second)


def test_auto_without_a_target_is_an_empty_table():
    assert TokenRecycling().table.filled_rows() == 0
    assert Hybrid().recycling.table.filled_rows() == 0
    assert len(ADED().table) == 0


@pytest.mark.real
def test_auto_tables_adapt_to_the_options(smollm2, tmp_path):
    # a wider recycling table than the shipped one (8 ranks): the shipped ranks fill the first columns
    wide = make_drafter("recycling", {"top_k": "16", "tree_budget": "8"}, target=smollm2)
    assert wide.table.table.shape[1] == 16 and wide.table.filled_rows() > 10_000
    assert (wide.table.table[:, 8:] == -1).all()
    wide.save(tmp_path / "wide.pt")
    from_path = TokenRecycling(top_k=16, table_path=tmp_path / "wide.pt")  # a Path works as well as a str
    assert (from_path.table.table == wide.table.table).all()
    # ADED keeps a loaded table's own top_k and cap: asking for others gives an empty table of that shape
    small = make_drafter("aded", {"top_k": "4"}, target=smollm2)
    assert len(small.table) == 0 and small.table.top_k == 4
    # each drafter gets its own copy of the shipped tri-grams: one learning does not change another
    one, two = make_drafter("aded", {}, target=smollm2), make_drafter("aded", {}, target=smollm2)
    assert one.table is not two.table and one.table.keys is not two.table.keys
    before = len(two.table)
    one.reset([7, 7, 7, 123, 456, 789, 7, 7, 7])
    one.table.add(40000, 40001, 40002)
    assert len(two.table) == before and not two.table.row(40000, 40001)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register(app)
    return app


def test_distill_tables_rejects_bad_options(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(_app(), ["distill-tables", "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output
    (tmp_path / "file").write_text("x")
    not_dir = runner.invoke(_app(), ["distill-tables", "--out", str(tmp_path / "file")])
    assert not_dir.exit_code == 2 and "not a directory" in not_dir.output
    unknown = runner.invoke(_app(), ["distill-tables", "--out", str(tmp_path / "o"), "--model", "no-such-model"])
    assert unknown.exit_code == 2 and "no-such-model" in unknown.output


@pytest.mark.real
def test_distill_tables_writes_loadable_tables(tmp_path, smollm2):
    out = tmp_path / "tables"
    result = CliRunner().invoke(_app(), ["distill-tables", "--out", str(out), "--limit", "1", "-n", "4",
                                         "--samples", "1", "--batch-size", "2", "--top-k", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3  # one passage, one prompt, one passage task; greedy and one sampled answer each
    assert all(0 < len(r["answer_ids"]) <= 4 for r in rows)
    # rows are labelled with their own prompts: passage, prompt, passage task; then the same three sampled
    assert rows[0]["prompt"] == PASSAGE.format(topic=TOPICS[0]) and rows[1]["prompt"] == corpus_prompts(0)[1][0]
    assert rows[2]["prompt"].startswith(ON_PASSAGE[0].split("{")[0])
    assert [r["prompt"] for r in rows[3:]] == [r["prompt"] for r in rows[:3]]
    assert [r["sampled"] for r in rows] == [False] * 3 + [True] * 3
    assert all(r["prompt_ids"] == smollm2.encode(r["prompt"]) for r in rows)
    meta = json.loads((out / "target.json").read_text())
    assert meta["fingerprint"] == target_fingerprint(smollm2) and meta["answers"] == 6
    recycling = make_drafter("recycling", {"table_path": str(out / "recycling.pt"), "top_k": "4"}, target=smollm2)
    assert recycling.table.filled_rows() > 0
    aded = make_drafter("aded", {"table": str(out / "trigrams.npz")}, target=smollm2)
    first = rows[0]["answer_ids"]
    assert aded.table.row(-1, first[0])  # the answer's bigrams were counted
    at_risk, survived = read_chain_counts(out / "chains.json")  # counted on the greedy answers only
    expected = chain_counts([(r["prompt_ids"], r["answer_ids"]) for r in rows[:3]])
    assert (at_risk == expected[0]).all() and (survived == expected[1]).all()
    hybrid = make_drafter("hybrid", {"chain_prior": str(out / "chains.json")}, target=smollm2)
    assert hybrid.chain_stats.probs(1).shape == (32,)


def test_greedy_pairs_reads_the_greedy_answers_of_a_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "sampled": False, "prompt_ids": [1, 2], "answer_ids": [3]},
        {"prompt": "a", "sampled": True, "prompt_ids": [1, 2], "answer_ids": [4]},
        {"prompt": "b", "prompt_ids": [5], "answer_ids": []}]) + "\n\n")
    assert greedy_pairs(corpus) == [([1, 2], [3]), ([5], [])]
    bad = tmp_path / "bad.jsonl"
    for text in ('{"prompt_ids": [1]}\n', "not json\n", "[1, 2]\n"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.jsonl"):
            greedy_pairs(bad)
    with pytest.raises(ValueError, match="missing.jsonl"):
        greedy_pairs(tmp_path / "missing.jsonl")
