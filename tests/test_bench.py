"""`leapdecode bench`: suites, method parsing, the interleaved harness, exactness flags, reports and the CLI.

End to end on a tiny random model that carries the real SmolLM2 tokenizer (so the built-in text prompts and the chat
template work) and on the real default model with a few prompts. A deliberately lossy method, plugged in through
run_bench's method list, must be flagged by the exactness check and shown as NOT EXACT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from leapdecode.bench.cli import register
from leapdecode.bench.methods import BASELINE, build_method, parse_methods
from leapdecode.bench.plots import PLOTS
from leapdecode.bench.report import (METRIC_KEYS, SUMMARY_KEYS, console_table, load_meta, load_raw, render_markdown,
                                     summarize, write_report)
from leapdecode.bench.runner import (RECORD_KEYS, BenchConfig, count_generations, encode, first_divergence,
                                     make_meta, run_bench, write_meta)
from leapdecode.bench.suites import BUILTIN, find_spec_bench, load_spec_bench, select
from leapdecode.models.tiny import tiny_model

NEW_TOKENS = 16
FLIP_AT = 3  # the lossy method changes the token at this position of one answer


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:  # a group, like leapdecode's own app
        pass

    register(app)
    return app


class Recorded:
    """Wraps a method and logs each call's method name (to check the interleaving order)."""

    def __init__(self, inner, log: list[str], name: str | None = None) -> None:
        self.inner, self.log = inner, log
        self.name, self.kind, self.options = name or inner.name, inner.kind, inner.options

    def generate(self, prompt_ids, max_new_tokens, sampling):
        self.log.append(self.name)
        return self.inner.generate(prompt_ids, max_new_tokens, sampling)


class Lossy(Recorded):
    """Plain decoding, except that for one chosen prompt the token at FLIP_AT is replaced: a method that changes
    the output, which the exactness check must catch."""

    def __init__(self, inner, log, victim: list[int], vocab_size: int) -> None:
        super().__init__(inner, log, name="lossy")
        self.victim, self.vocab_size = victim, vocab_size

    def generate(self, prompt_ids, max_new_tokens, sampling):
        run = super().generate(prompt_ids, max_new_tokens, sampling)
        if list(prompt_ids) == self.victim:
            run.tokens[FLIP_AT] = (run.tokens[FLIP_AT] + 1) % self.vocab_size
        return run


# ------------------------------------------------------------------------------------------------------- suites


def test_builtin_suite_covers_every_task():
    by_task = {}
    for q in BUILTIN:
        by_task.setdefault(q.category, []).append(q)
    assert set(by_task) == {"chat", "code", "summarization", "translation", "math", "rag"}
    assert all(len(qs) >= 2 for qs in by_task.values())
    assert any(len(q.turns) > 1 for q in BUILTIN)  # multi-turn handling is exercised by the built-in suite too
    assert len({q.question_id for q in BUILTIN}) == len(BUILTIN)


def test_spec_bench_loading_and_selection(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [(1, "writing", ["w1a", "w1b"]), (2, "writing", ["w2a", "w2b"]), (3, "rag", ["r1"]), (4, "rag", ["r2"]),
            (5, "rag", ["r3"])]
    path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": t}) + "\n" for i, c, t in rows))
    questions = load_spec_bench(path)
    assert [q.question_id for q in questions] == [1, 2, 3, 4, 5]
    # limit is per category, categories keep the order asked for, first turn only on request
    chosen = select(questions, ["rag", "writing"], limit=1, turns="first")
    assert [(q.question_id, q.turns) for q in chosen] == [(3, ("r1",)), (1, ("w1a",))]
    assert [len(q.turns) for q in select(questions)] == [2, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown category nope; this suite has: writing, rag"):
        select(questions, ["nope"])
    assert find_spec_bench(path) == path
    with pytest.raises(FileNotFoundError, match="Spec-Bench.*--suite builtin"):
        find_spec_bench(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["x"]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a Spec-Bench question"):
        load_spec_bench(bad)


def test_parse_methods():
    specs = parse_methods("pld,hf-pld", ["pld.max_ngram=4", "hf-pld.prompt_lookup_num_tokens=5"])
    # none is added first: exactness and speed-up are measured against it
    assert [(s.name, s.options) for s in specs] == [
        ("none", {}), ("pld", {"max_ngram": "4"}), ("hf-pld", {"prompt_lookup_num_tokens": "5"})]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_methods("none,nope")
    with pytest.raises(ValueError, match="not METHOD.KEY=VALUE"):
        parse_methods("pld", ["max_ngram=4"])
    with pytest.raises(ValueError, match="for 'copy', which is not among the methods"):
        parse_methods("pld", ["copy.gamma=2"])
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods("pld,pld")


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one output stopped early: they differ where it stopped


# --------------------------------------------------------------------------------------------- tiny end to end


@pytest.fixture(scope="module")
def tiny_chat(smollm2):
    """A tiny random llama with SmolLM2's tokenizer and chat template (eos = <|im_end|>, id 2)."""
    return tiny_model("llama", tokenizer=smollm2.tokenizer, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_run(tiny_chat, tmp_path_factory):
    """One run of the harness on the built-in suite (first question per task) with every kind of method."""
    model = tiny_chat
    # the same weights as the target: as a draft model it should be right almost always
    assistant = tiny_model("llama", tokenizer=model.tokenizer, eos_token_id=2)
    runner = model.runner("hf")
    questions = select(list(BUILTIN), limit=1)
    log: list[str] = []
    specs = parse_methods("none,pld,copy,hf-greedy,hf-pld,hf-assisted,draft-model",
                          ["hf-assisted.num_assistant_tokens=5"])
    methods = [Recorded(build_method(s, model, runner, assistant=assistant), log) for s in specs]
    victim_question = next(q for q in questions if q.category == "math")
    victim = encode(model, victim_question.turns[:1], [], chat=True)
    methods.append(Lossy(build_method(parse_methods("none")[0], model, runner), log, victim, model.vocab_size))
    config = BenchConfig(max_new_tokens=NEW_TOKENS)
    out = tmp_path_factory.mktemp("bench")
    rows = run_bench(model, questions, methods, config, raw_path=out / "raw.jsonl")
    meta = make_meta(model=model, methods=methods, config=config, suite={"suite": "builtin"},
                     selection={"categories": None, "limit": 1, "turns": "all"}, questions=len(questions),
                     generations=count_generations(questions, methods, config), command="test", runner="HFRunner")
    write_meta(out / "meta.json", meta)
    summary = write_report(out, rows, meta)
    return {"model": model, "questions": questions, "methods": methods, "rows": rows, "log": log, "out": out,
            "meta": meta, "summary": summary, "victim": victim_question}


def test_rows_follow_the_schema(tiny_run):
    rows, questions, methods = tiny_run["rows"], tiny_run["questions"], tiny_run["methods"]
    # one row per method x question x turn (one repeat); the chat question has two turns
    assert len(rows) == len(methods) * sum(len(q.turns) for q in questions) == len(methods) * 7
    for row in rows:
        assert tuple(row) == RECORD_KEYS
        assert 0 < row["new_tokens"] <= NEW_TOKENS and len(row["tokens"]) == row["new_tokens"]
        assert row["seconds"] > 0 and row["tokens_per_second"] == pytest.approx(row["new_tokens"] / row["seconds"])
        if row["kind"] == "hf":  # transformers does not report steps
            assert row["steps"] is None and row["mat"] is None
        else:
            assert row["steps"] >= 1 and row["mat"] == pytest.approx(row["new_tokens"] / row["steps"])
    assert load_raw(tiny_run["out"]) == rows  # raw.jsonl holds exactly the rows returned


def test_methods_are_interleaved_and_rotated(tiny_run):
    names = [m.name for m in tiny_run["methods"]]
    log = tiny_run["log"]
    assert log[: len(names)] == names  # warm-up: one short generation per method, in list order
    calls = log[len(names):]
    for i, question in enumerate(tiny_run["questions"]):
        order = names[i % len(names):] + names[: i % len(names)]  # rotated by one per question
        block, calls = calls[: len(names) * len(question.turns)], calls[len(names) * len(question.turns):]
        assert block == [n for n in order for _ in question.turns]  # a method answers every turn in a row
    assert calls == []


def test_second_turn_sees_the_methods_own_answer(tiny_run):
    model, rows = tiny_run["model"], tiny_run["rows"]
    chat = next(q for q in tiny_run["questions"] if len(q.turns) == 2)
    for method in ("none", "pld", "hf-greedy"):
        first, second = [r for r in rows if r["question_id"] == chat.question_id and r["method"] == method]
        messages = [{"role": "user", "content": chat.turns[0]}, {"role": "assistant", "content": first["text"]},
                    {"role": "user", "content": chat.turns[1]}]
        # the second prompt is the conversation so far, including this method's first answer
        assert second["prompt_tokens"] == len(model.encode(messages)) > first["prompt_tokens"] + 1


def test_exactness_flags_only_the_lossy_method(tiny_run):
    rows, summary = tiny_run["rows"], tiny_run["summary"]
    lossy_rows = [r for r in rows if r["method"] == "lossy"]
    wrong = [r for r in lossy_rows if not r["identical"]]
    # exactly the victim's answer was changed, at FLIP_AT, so that is where it first differs from none's
    assert [(r["question_id"], r["first_divergence"]) for r in wrong] == [(tiny_run["victim"].question_id, FLIP_AT)]
    overall = summary["overall"]
    assert overall["lossy"]["exact"] is False and overall["lossy"]["identical"] == len(lossy_rows) - 1
    # every real method is lossless under greedy decoding (leapdecode drafters, and transformers on this model)
    for name in ("none", "pld", "copy", "draft-model", "hf-greedy", "hf-pld", "hf-assisted"):
        assert overall[name]["exact"] is True, (name, overall[name]["mismatches"])
    # the flag is per category too: only the victim's category is marked
    flagged = [c for c, block in summary["per_category"].items() if block["lossy"]["exact"] is False]
    assert flagged == ["math"]

    table = (tiny_run["out"] / "table.md").read_text()
    lossy_line = next(line for line in table.splitlines() if line.startswith("| **lossy**"))
    assert f"🔴 ⚠ **NOT EXACT (1/{len(lossy_rows)} differ)**" in lossy_line
    assert table.count("NOT EXACT") == 1  # nobody else is flagged
    assert f"from token {FLIP_AT}" in table  # the divergence list names where it went wrong
    console = console_table(summary)
    styles = {row.style for row in console.rows}
    assert styles == {None, "bold red"} and console.rows[-1].style == "bold red"  # lossy is last, in red


def test_summary_schema_and_aggregates(tiny_run):
    summary, rows = tiny_run["summary"], tiny_run["rows"]
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["methods"] == [m.name for m in tiny_run["methods"]]
    assert summary["categories"] == ["chat", "code", "summarization", "translation", "math", "rag"]
    assert summary["sampled"] is False
    for block in [summary["overall"], *summary["per_category"].values()]:
        for metrics in block.values():
            assert tuple(metrics) == METRIC_KEYS
    none = summary["overall"][BASELINE]
    # overall tokens/s is total tokens over total seconds, not a mean of per-question rates
    mine = [r for r in rows if r["method"] == BASELINE]
    assert none["tokens_per_second"] == pytest.approx(sum(r["new_tokens"] for r in mine)
                                                      / sum(r["seconds"] for r in mine))
    assert none["speedup_vs_none"] == pytest.approx(1.0) and none["mat"] == pytest.approx(1.0)
    assert summary["overall"]["hf-greedy"]["speedup_vs_hf_greedy"] == pytest.approx(1.0)
    assert summary["overall"]["hf-pld"]["mat"] is None  # unknown for transformers methods
    # the draft model has the target's own weights, so its 5-token drafts are accepted (MAT near 16 / 3)
    assert summary["overall"]["draft-model"]["mat"] > 3
    assert summary["overall"]["draft-model"]["acceptance_per_depth"][0] > 0.9
    assert summary["overall"]["copy"]["drafter_state_bytes"] > 0  # copy reports its index size
    assert none["peak_memory_bytes"] > 0
    assert set(json.loads((tiny_run["out"] / "summary.json").read_text())) == set(SUMMARY_KEYS)
    for plot in PLOTS:
        assert (tiny_run["out"] / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_reproduces_the_table_from_raw_json(tiny_run):
    out = tiny_run["out"]
    written = (out / "table.md").read_text()
    summary_written = (out / "summary.json").read_text()
    (out / "table.md").unlink()
    (out / "summary.json").unlink()
    # through the real entry point, which registers the bench group
    result = subprocess.run([sys.executable, "-m", "leapdecode.cli", "bench", "report", str(out), "--no-plots"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # rebuilt from raw.jsonl + meta.json only: byte for byte what the run wrote from its rows in memory
    assert (out / "table.md").read_text() == written
    assert (out / "summary.json").read_text() == summary_written
    assert render_markdown(summarize(load_raw(out), load_meta(out)), load_meta(out)) == written


def test_an_interrupted_run_says_it_is_partial(tiny_run):
    meta, methods = tiny_run["meta"], tiny_run["methods"]
    rows = tiny_run["rows"][: 2 * len(methods)]  # raw.jsonl of a run stopped after its first question (two turns)
    text = render_markdown(summarize(rows, meta), meta)
    # counts come from the rows; the plan from meta.json
    assert f"1 questions (all; first 1 per category; turns: all), {2 * len(methods)} generations " \
           f"(**partial run**: {meta['generations']} planned)" in text
    assert "partial run" not in (tiny_run["out"] / "table.md").read_text()


def test_sampled_runs_mark_identity_not_applicable(tiny_chat):
    runner = tiny_chat.runner("hf")
    methods = [build_method(s, tiny_chat, runner) for s in parse_methods("none,pld,hf-greedy")]
    config = BenchConfig(max_new_tokens=8, temperature=0.8, seed=3, warmup=False)
    rows = run_bench(tiny_chat, select(list(BUILTIN), ["translation"], limit=1), methods, config)
    # one sample says nothing about a distribution: identity is not judged
    assert all(r["identical"] is None for r in rows)
    summary = summarize(rows, {"config": {"temperature": 0.8}})
    assert summary["sampled"] is True and summary["overall"]["pld"]["exact"] is None
    assert "n/a (sampled)" in render_markdown(summary) and "NOT EXACT" not in render_markdown(summary)


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_on_a_model_directory(tiny_chat, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_chat.hf_model.save_pretrained(model_dir)
    tiny_chat.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = ["bench", "--model", str(model_dir), "--suite", "builtin", "--categories", "math,chat", "--limit", "1",
            "--turns", "first", "-n", "6", "--drafters", "pld,hf-greedy", "--option", "pld.max_ngram=2",
            "--out", str(out), "--no-plots"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    # not a terminal: progress comes as log lines, the first at the start and the last when all are done
    assert "bench 0/6 generations" in result.output and "bench 6/6 generations" in result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["methods"] == [{"name": "none", "kind": "leapdecode", "options": {}},
                               {"name": "pld", "kind": "leapdecode", "options": {"max_ngram": "2"}},
                               {"name": "hf-greedy", "kind": "hf", "options": {}}]
    assert meta["selection"] == {"categories": ["math", "chat"], "limit": 1, "turns": "first"}
    for key in ("date", "machine", "versions", "model", "dtype", "device", "command", "config"):
        assert meta[key]
    rows = load_raw(out)
    # 2 questions (first turn only) x 3 methods, in the category order asked for
    assert len(rows) == 6 and [r["category"] for r in rows[::3]] == ["math", "chat"]
    assert "| pld |" in (out / "table.md").read_text()
    again = CliRunner().invoke(cli_app(), args)
    assert again.exit_code == 2 and "already exists" in again.output  # never appends to an old run


@pytest.mark.parametrize("args, message", [
    (["--questions", "/no/such/question.jsonl"], "Spec-Bench question file"),
    (["--suite", "builtin", "--categories", "poetry"], "unknown category poetry"),
    (["--suite", "builtin", "--drafters", "none,warp-drive"], "unknown method 'warp-drive'"),
    (["--suite", "builtin", "--drafters", "hf-assisted"], "needs a draft model: pass --assistant"),
    (["--suite", "builtin", "--turns", "second"], "turns must be 'all' or 'first'"),
])
def test_cli_errors_are_clear(args, message, tmp_path):  # all caught before any model is loaded
    result = CliRunner().invoke(cli_app(), ["bench", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # rich wraps long lines


# ------------------------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_model_end_to_end(smollm2, tmp_path):
    runner = smollm2.runner("hf")
    methods = [build_method(s, smollm2, runner) for s in parse_methods("none,pld,copy,hf-greedy,hf-pld")]
    questions = select(list(BUILTIN), ["rag", "summarization", "code"], limit=1)
    config = BenchConfig(max_new_tokens=NEW_TOKENS)
    rows = run_bench(smollm2, questions, methods, config, raw_path=tmp_path / "raw.jsonl")
    summary = write_report(tmp_path, rows, {"config": {"temperature": 0.0}}, plots=False)
    overall = summary["overall"]
    assert len(rows) == 3 * len(methods)
    for name in ("pld", "copy"):  # leapdecode drafters are lossless on the real model
        assert overall[name]["exact"] is True, overall[name]["mismatches"]
    # hf-greedy's identity is measured, whatever it is (SDPA vs masked numerics may differ): never left out
    assert overall["hf-greedy"]["compared"] == 3
    # answers quoting a passage are where copying pays: some draft tokens are accepted
    assert overall["copy"]["mat"] > 1.0 or overall["pld"]["mat"] > 1.0
    assert all(overall[m]["speedup_vs_none"] > 0 for m in overall)
    # plain decoding emits exactly one token per step (an EOS that ends a generation counts: a step produced it)
    assert overall["none"]["mat"] == 1.0
    assert "| hf-pld |" in (tmp_path / "table.md").read_text()

