"""The batched runner and the continuous-batching scheduler: each sequence's output is what it gets alone.

Tiny random-weight models in float32 (Llama, Qwen2, Gemma 3 with sliding-window layers). Sequences of different
prompt lengths, output lengths and drafters join and leave a running batch of three slots, their prompts prefilled in
chunks of 7 tokens; each one's greedy tokens must equal offline plain decoding of that prompt alone.
"""

from __future__ import annotations

import gzip
import io
import json
import queue

import pytest
import torch

from leapdecode import GenerationConfig, SamplingConfig, speculate
from leapdecode.drafters.base import Draft
from leapdecode.drafters.registry import make_drafter, names
from leapdecode.models.fast import FastRunner
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.models.hf import HFRunner
from leapdecode.serve.batch_runner import BatchRunner
from leapdecode.serve.scheduler import Overloaded, Scheduler, SchedulerConfig, Unavailable
from leapdecode.serve.trace import markdown, read_trace, summarize
from leapdecode.serve.sequence import Delta, Failed, Finished, Sequence, TextAssembler, needs_reproducible_drafts
from leapdecode.draft_length import StepCost
from scripted_drafters import EstimatingDrafter, OracleDrafter, OracleTreeDrafter, RandomDrafter

VOCAB = 64
# frozen cost curves (weight 0: real step times do not move them), in units of a plain step
FLAT = {1: 1.0, 1 << 20: 1.0}  # wider steps cost nothing: the scheduler drafts the most it may
STEEP = {1: 1.0, 2: 50.0}  # any draft is ruinous: the scheduler decodes plainly


def make_prompts(seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(VOCAB, (n,), generator=g).tolist() for n in (1, 3, 9, 17, 30, 41, 60, 25)]
    return [p + p[:8] if i % 2 else p for i, p in enumerate(prompts)]  # repeats for the n-gram drafters


def plain(model, prompt, new_tokens, seed=None, temperature=0.0) -> list[int]:
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True,
                              sampling=SamplingConfig(temperature=temperature, seed=seed))
    return [t for step in speculate(HFRunner(model.hf_model), prompt, None, config) for t in step]


def batch_runner(kind: str, model, max_batch: int):
    """The server's two batched runners: transformers' forward ("hf") or leapdecode's own ("fast")."""
    if kind == "fast":
        return FastBatchRunner(FastRunner(model.hf_model), max_batch)
    return BatchRunner(model.hf_model, max_batch)


def run_all(scheduler: Scheduler, specs) -> list[Finished | Failed]:
    """Submit (prompt, config, drafter) specs; return each sequence's final event, in order."""
    events: queue.Queue = queue.Queue()
    for i, (prompt, config, drafter) in enumerate(specs):
        seq = Sequence(list(prompt), config, drafter, sink=lambda ev, i=i: events.put((i, ev)),
                       text=TextAssembler(lambda t: " ".join(map(str, t)), config.stop),
                       reproducible=needs_reproducible_drafts(config))
        scheduler.submit(seq)
    final: dict[int, Finished | Failed] = {}
    while len(final) < len(specs):
        i, ev = events.get(timeout=120)
        if isinstance(ev, (Finished, Failed)):
            final[i] = ev
    return [final[i] for i in range(len(specs))]


def test_batched_verification_matches_single_sequence_runner(tiny):
    # three sequences of different lengths, one step each with a chain, a tree and an empty draft, then a release
    # that moves the last row: every row's logits must equal the single-sequence HFRunner's on the same input
    # (up to float32 rounding: the batched matmuls have other shapes; these logits are of order 10)
    prompts = make_prompts()[2:5]
    batch = BatchRunner(tiny.hf_model, max_batch=4, capacity=8)  # capacity 8 also exercises growth
    singles = [HFRunner(tiny.hf_model) for _ in prompts]
    slots = [batch.allocate() for _ in prompts]
    for prompt, single, slot in zip(prompts, singles, slots):
        single.prefill(prompt[:-1])
        for i in range(0, len(prompt) - 1, 5):  # chunked prefill
            batch.prefill(slot, prompt[:-1][i : i + 5])
    drafts = [Draft.chain([1, 2, 3]), Draft.tree([4, 5, 6, 7], [-1, -1, 0, 1]), Draft.empty()]
    paths = [[0, 1], [1, 3], []]  # a chain prefix, a non-prefix tree path (gathered), nothing
    roots = [p[-1] for p in prompts]
    for _ in range(2):
        got = batch.verify(list(zip(slots, roots, drafts)))
        for k in range(3):
            want = singles[k].verify(roots[k], drafts[k])
            torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-4)
            singles[k].commit(paths[k])
            batch.commit(slots[k], paths[k])
            roots[k] = 11
    assert [s.length for s in slots] == [s.cache_len for s in singles]
    batch.release(slots[0])  # slot 2 moves into row 0
    assert slots[2].row == 0 and batch.free_slots == 2
    got = batch.verify([(slots[1], 5, Draft.chain([9])), (slots[2], 6, Draft.empty())])
    torch.testing.assert_close(got[0], singles[1].verify(5, Draft.chain([9])), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], singles[2].verify(6, Draft.empty()), rtol=1e-4, atol=1e-4)


def registry_drafters(model):
    """Every registry drafter (the draft model is the target itself: everything it drafts is accepted)."""
    for name in names():
        if name == "draft-model":
            yield make_drafter(name, {"model": model, "num_draft_tokens": 4}, target=model)
        else:
            yield make_drafter(name, target=model)


LENGTHS = [12, 30, 20, 26, 15, 30, 9, 24]  # new tokens per prompt: sequences leave the batch at different times
_expected: dict[str, list[list[int]]] = {}


def expected_outputs(model) -> list[list[int]]:
    """Offline plain greedy decoding of each prompt alone (computed once per model)."""
    if model.name not in _expected:
        _expected[model.name] = [plain(model, p, n) for p, n in zip(make_prompts(), LENGTHS)]
    return _expected[model.name]


@pytest.mark.parametrize("runner", ["hf", "fast"])
@pytest.mark.parametrize("cost", [FLAT, STEEP], ids=["speculate", "plain"])
def test_every_sequence_matches_plain_decoding_alone(tiny, cost, runner):
    prompts, lengths = make_prompts(), LENGTHS
    expected = expected_outputs(tiny)
    drafters = list(registry_drafters(tiny))
    scheduler = Scheduler(batch_runner(runner, tiny, 3), SchedulerConfig(max_batch=3, prefill_chunk=7, max_draft=8),
                          cost=StepCost(cost, weight=0.0))
    scheduler.start()
    try:
        specs = []
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            drafter = drafters[i % len(drafters)] if i < len(drafters) else \
                [RandomDrafter, OracleTreeDrafter][i % 2](p + expected[i], VOCAB)
            specs.append((p, GenerationConfig(max_new_tokens=n, ignore_eos=True), drafter))
        specs.append((prompts[5], GenerationConfig(max_new_tokens=lengths[5], ignore_eos=True),
                      OracleDrafter(prompts[5] + expected[5], VOCAB, right=3)))
        results = run_all(scheduler, specs)
    finally:
        assert scheduler.stop()
    for i, result in enumerate(results):
        assert isinstance(result, Finished), result
        want = expected[i] if i < len(prompts) else expected[5]
        assert result.tokens == want, f"sequence {i} ({specs[i][2].name})"
        assert result.finish_reason == "length"
    if cost is FLAT:  # the oracle right for 3 tokens was given room to draft: it had tokens accepted
        assert results[-1].stats.accepted_tokens > 0
    else:  # no draft node was verified (lookahead's unverified Jacobi window may still ride along)
        assert all(r.stats.draft_tokens == 0 for r in results)


@pytest.mark.parametrize("runner", ["hf", "fast"])
def test_calibrated_scheduler_and_eos(tiny_models, runner):
    # the real cost model (calibrated at start), EOS stopping and a seeded sampling request with drafter none:
    # sampling through the batch consumes the request's own generator exactly as offline plain sampling does
    model = tiny_models["llama"]
    prompt = make_prompts()[4]
    greedy = plain(model, prompt, 30)
    eos = greedy[10]  # the first occurrence of this token ends the greedy run
    cut = greedy.index(eos)
    sampled = plain(model, prompt, 30, seed=7, temperature=0.8)
    scheduler = Scheduler(batch_runner(runner, model, 2), SchedulerConfig(max_batch=2, calibration_rows=(1, 4, 16)))
    scheduler.start()
    try:
        # calibrated on scratch sequences that it gave back: a curve over the configured sizes, a per-sequence cost
        assert scheduler.runner.free_slots == 2 and sorted(scheduler.cost.points) == [1, 4, 16]
        assert scheduler.cost.per_sequence >= 0.0 and scheduler.cost.estimate(4, 2) >= scheduler.cost.estimate(4)
        events: queue.Queue = queue.Queue()
        sampling = GenerationConfig(max_new_tokens=30, ignore_eos=True, sampling=SamplingConfig(0.8, seed=7))
        seqs = [Sequence(list(prompt), GenerationConfig(max_new_tokens=30), make_drafter("copy"),
                         sink=lambda ev: events.put(("greedy", ev)), text=TextAssembler(str), eos_token_ids=(eos,)),
                Sequence(list(prompt), sampling, make_drafter("none"), sink=lambda ev: events.put(("sampled", ev)),
                         text=TextAssembler(str))]
        for seq in seqs:
            scheduler.submit(seq)
        final = {}
        while len(final) < 2:
            key, ev = events.get(timeout=120)
            if isinstance(ev, (Finished, Failed)):
                final[key] = ev
    finally:
        scheduler.stop()
    assert final["greedy"].tokens == greedy[:cut] and final["greedy"].finish_reason == "stop"
    assert final["sampled"].tokens == sampled


@pytest.mark.parametrize("runner", ["hf", "fast"])
def test_seeded_sampling_is_reproducible_under_any_load(tiny_models, runner):
    # a seeded sampling request drafts by its own history only, so it returns the same tokens alone and in a
    # crowded batch whose other members change the batch-wide draft length
    model = tiny_models["gemma3"]
    prompts = make_prompts()
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True, sampling=SamplingConfig(1.0, top_k=20, seed=11))

    def run(with_crowd: bool) -> list[int]:
        scheduler = Scheduler(batch_runner(runner, model, 4), SchedulerConfig(max_batch=4, max_draft=8),
                              cost=StepCost(FLAT, weight=0.0))
        scheduler.start()
        try:
            specs = [(prompts[3], config, make_drafter("lookahead"))]
            if with_crowd:
                specs += [(p, GenerationConfig(max_new_tokens=20, ignore_eos=True), make_drafter("pld"))
                          for p in prompts[4:7]]
            return run_all(scheduler, specs)[0].tokens
        finally:
            scheduler.stop()

    assert run(False) == run(True)


@pytest.mark.parametrize("runner", ["hf", "fast"])
def test_cancel_overload_and_stop(tiny_models, runner):
    model = tiny_models["qwen2"]
    scheduler = Scheduler(batch_runner(runner, model, 1), SchedulerConfig(max_batch=1, max_waiting=1),
                          cost=StepCost(STEEP, weight=0.0))
    with pytest.raises(Unavailable):  # not started yet
        scheduler.submit(Sequence([1, 2], GenerationConfig(), make_drafter("none"), print, TextAssembler(str)))
    scheduler.start()
    events: queue.Queue = queue.Queue()
    long = GenerationConfig(max_new_tokens=4000, ignore_eos=True)

    def seq(name):
        return Sequence([1, 2, 3], long, make_drafter("none"), lambda ev: events.put((name, ev)), TextAssembler(str))

    running, waiting = seq("running"), seq("waiting")
    scheduler.submit(running)
    while True:  # wait until `running` holds the only slot (it has produced text)
        name, ev = events.get(timeout=60)
        if name == "running" and isinstance(ev, Delta):
            break
    scheduler.submit(waiting)  # queued: the one slot is taken
    with pytest.raises(Overloaded):  # the queue (1) is full
        scheduler.submit(seq("refused"))
    scheduler.cancel(running)  # frees the slot at the next step; `waiting` gets it
    ends = {}
    while "running" not in ends:
        name, ev = events.get(timeout=60)
        if isinstance(ev, Finished):
            ends[name] = ev
    assert ends["running"].finish_reason == "cancelled" and len(ends["running"].tokens) < 4000
    assert not scheduler.stop(drain=True, timeout=0.5)  # `waiting` cannot finish 4000 tokens in time: cancelled
    while "waiting" not in ends:
        name, ev = events.get(timeout=60)
        if isinstance(ev, Finished):
            ends[name] = ev
    assert ends["waiting"].finish_reason == "cancelled"
    assert scheduler.running_count == scheduler.waiting_count == 0 and scheduler.runner.free_slots == 1


def test_text_assembler_holds_back_possible_stop_strings():
    pieces = {1: "ab", 2: "c", 3: "XY", 4: "Zd"}
    text = TextAssembler(lambda tokens: "".join(pieces[t] for t in tokens), stop=("XYZ",))
    # "ab": the last 2 characters could start "XYZ", so they are held back
    assert text.add([1]) == ""
    assert text.add([2]) == "a"  # "abc": "bc" held
    assert text.add([3]) == "bc"  # "abcXY": "XY" held (it may become XYZ)
    assert text.add([4]) == "" and text.stopped  # "abcXYZd": stop found, the text ends before it
    assert text.text == "abc" and text.flush() == ""


@pytest.mark.parametrize("runner", ["hf", "fast"])
@pytest.mark.parametrize("name", ["recycling", "hybrid"])
def test_forks_of_one_drafter_learn_together_and_stay_exact(tiny, runner, name):
    # `leapdecode serve --share-drafter-state`: every request drafts with a fork of one drafter, so the token table
    # and the acceptance counts are shared by sequences running in the same batch; each output is still exactly
    # what plain decoding gives that prompt alone
    prompts, expected = make_prompts(), expected_outputs(tiny)
    parent = make_drafter(name, {"table_path": ""}, target=tiny)
    scheduler = Scheduler(batch_runner(runner, tiny, 3), SchedulerConfig(max_batch=3, prefill_chunk=7, max_draft=8),
                          cost=StepCost(FLAT, weight=0.0))
    scheduler.start()
    try:
        results = run_all(scheduler, [(p, GenerationConfig(max_new_tokens=n, ignore_eos=True), parent.fork())
                                      for p, n in zip(prompts, LENGTHS)])
    finally:
        assert scheduler.stop()
    assert [r.tokens for r in results] == expected
    recycling = parent if name == "recycling" else parent.recycling
    # the parent never drafted itself: what it holds now, its forks taught it
    assert recycling.table.filled_rows() > 0
    assert recycling.template.trials.sum() > 0
    assert sum(r.stats.draft_tokens for r in results) > 0


def test_rows_follow_the_drafters_estimates_and_their_record(tiny_models):
    # without padding, the scheduler shares a step's rows by each drafter's own acceptance estimates, scaled by how
    # they have matched the outcome: a row costs 0.3 of a plain step here, so a node must be likelier than that
    model = tiny_models["llama"]
    prompts, length = make_prompts()[3:5], 40
    expected = [plain(model, p, length) for p in prompts]
    per_row = StepCost({1: 1.0, 1 << 20: 1.0 + 0.3 * ((1 << 20) - 1)}, weight=0.0)
    honest = EstimatingDrafter(prompts[0] + expected[0], VOCAB, right=6, claimed=0.9, name="honest")
    boastful = EstimatingDrafter(prompts[1] + expected[1], VOCAB, right=0, claimed=0.9, name="boastful")
    scheduler = Scheduler(batch_runner("fast", model, 2), SchedulerConfig(max_batch=2, max_draft=6), cost=per_row)
    scheduler.start()
    try:
        config = GenerationConfig(max_new_tokens=length, ignore_eos=True)
        results = run_all(scheduler, [(prompts[0], config, honest), (prompts[1], config, boastful)])
    finally:
        scheduler.stop()
    assert [r.tokens for r in results] == expected  # whatever the budgets, the output is plain decoding's
    assert sum(honest.budgets) >= 3 * len(honest.budgets)  # right every time: it keeps drafting deep
    assert boastful.budgets[0] > 0  # taken at its word at first ...
    assert boastful.budgets[-10:] == [0] * 10  # ... until its record says 0.9 means nothing: plain decoding


class PrefillRecorder(FastBatchRunner):
    """The fast batched runner, noting the size of every prefill chunk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks: list[int] = []

    def prefill(self, slot, tokens) -> None:
        self.chunks.append(len(tokens))
        super().prefill(slot, tokens)


def test_prefill_keeps_its_pace_while_others_speculate(tiny_models):
    # a 5-row step costs twice a plain one here, and the running request drafts 4 nodes a step (its drafter is sure,
    # and right): after each such step the joining request gets two prefill chunks, not one
    model = tiny_models["llama"]
    short, long = make_prompts()[1][:2], make_prompts()[6]  # 1 token to prefill; 59
    expected = plain(model, short, 40)
    drafter = EstimatingDrafter(short + expected, VOCAB, right=6, claimed=0.99, length=4)
    runner = PrefillRecorder(FastRunner(model.hf_model), 2)
    cost = StepCost({1: 1.0, 5: 2.0, 1 << 20: float(1 << 20)}, weight=0.0)
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=2, prefill_chunk=7, max_draft=4), cost=cost)
    scheduler.start()
    try:
        config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
        joining = (long, GenerationConfig(max_new_tokens=2), make_drafter("none"))
        results = run_all(scheduler, [(short, config, drafter), joining])
    finally:
        scheduler.stop()
    assert results[0].tokens == expected and isinstance(results[1], Finished)
    assert max(drafter.budgets) == 4
    assert max(runner.chunks) == 14 and runner.chunks.count(14) >= 3  # 59 tokens, 14 at a time


def test_the_step_trace_accounts_for_every_token(tiny_models):
    # `leapdecode serve --trace`: one JSON line per iteration; the decode steps' emitted tokens add up to what the
    # requests received, the prefilled tokens to their prompts (the root excepted), and the summary reads it back
    tiny, trace = tiny_models["llama"], io.StringIO()
    prompts, expected = make_prompts(), expected_outputs(tiny)
    scheduler = Scheduler(batch_runner("fast", tiny, 3), SchedulerConfig(max_batch=3, prefill_chunk=7, max_draft=8),
                          cost=StepCost(FLAT, weight=0.0), trace=trace)
    scheduler.start()
    try:
        drafters = [make_drafter("hybrid", {"table_path": ""}, target=tiny) if i % 2 else make_drafter("none")
                    for i in range(len(prompts))]
        specs = [(p, GenerationConfig(max_new_tokens=n, ignore_eos=True), d)
                 for p, n, d in zip(prompts, LENGTHS, drafters)]
        results = run_all(scheduler, specs)
    finally:
        assert scheduler.stop()
    assert [r.tokens for r in results] == expected
    lines = [json.loads(text) for text in trace.getvalue().splitlines()]
    steps = [line for line in lines if "rows" in line]
    assert steps and all(line["rows"] >= line["sequences"] >= 1 for line in steps)
    assert sum(line["sequences"] + line["accepted"] for line in steps) == sum(len(r.tokens) for r in results)
    assert sum(line["prefill_tokens"] for line in lines) == sum(len(p) - 1 for p in prompts)
    assert any(line["rows"] > line["sequences"] for line in steps)  # hybrid drafted, for free here
    summary = summarize(lines)
    assert set(summary.by_drafters) <= {"hybrid", "none", "hybrid+none"} and "hybrid+none" in summary.by_drafters
    assert sum(g.emitted for g in summary.by_drafters.values()) == sum(len(r.tokens) for r in results)
    assert sum(g.steps for g in summary.by_size.values()) == len(steps)
    assert "| hybrid+none | all |" in markdown(summary) and "| resting |" in markdown(summary)


def test_a_gzipped_trace_reads_as_the_trace(tmp_path):
    lines = [{"iteration_s": 0.01, "rows": 3, "sequences": 2}, {"iteration_s": 0.02, "prefill_tokens": 7}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"iteration_s": 0.0'  # a half-written last line
    (tmp_path / "t.jsonl").write_text(text)
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert read_trace(tmp_path / "t.jsonl") == read_trace(tmp_path / "t.jsonl.gz") == lines
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text.encode())[:-12])
    with pytest.raises(OSError, match="gzip"):
        read_trace(tmp_path / "cut.jsonl.gz")
    (tmp_path / "plain.gz").write_text(text)
    with pytest.raises(OSError):
        read_trace(tmp_path / "plain.gz")


class RestingDrafter(EstimatingDrafter):
    """An EstimatingDrafter that allows the scheduler to skip it for some steps, and counts its observations."""

    skips_steps = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.observed = 0

    def observe(self, step) -> None:
        self.observed += 1
        super().observe(step)


def decode_alone(model, prompt, length, drafter, cost, trace=None):
    """One greedy request of `length` tokens through a two-slot scheduler with this cost model; its Finished."""
    scheduler = Scheduler(batch_runner("fast", model, 2), SchedulerConfig(max_batch=2, max_draft=4), cost=cost,
                          trace=trace)
    scheduler.start()
    try:
        return run_all(scheduler, [(prompt, GenerationConfig(max_new_tokens=length, ignore_eos=True), drafter)])[0]
    finally:
        scheduler.stop()


@pytest.mark.parametrize("plain_seconds", [1e-7, 1e3])
def test_a_drafter_rests_while_its_work_costs_more_than_its_drafts_gain(tiny_models, plain_seconds):
    # the same drafter (right for 1 token a step, and says so) against two cost models: a step priced at 1e-7 s,
    # next to which the drafter's own Python work (microseconds) costs more than a drafted token gains, so it rests
    # (consulted in bursts of 4 steps, then 32 steps off); and one at 1000 s, where its work is nothing and it is
    # consulted every step. The output is plain decoding's either way.
    model = tiny_models["llama"]
    prompt, length = make_prompts()[4], 80
    expected = plain(model, prompt, length)
    drafter = RestingDrafter(prompt + expected, VOCAB, right=1, claimed=0.9)
    cost = StepCost({1: plain_seconds, 1 << 20: plain_seconds * (1 + 1e-3 * ((1 << 20) - 1))}, weight=0.0)
    result = decode_alone(model, prompt, length, drafter, cost)
    assert result.tokens == expected
    steps = result.stats.steps
    assert drafter.observed == len(drafter.budgets)  # propose and observe are skipped together
    if plain_seconds > 1:
        assert len(drafter.budgets) == steps and result.stats.accepted_tokens > 0
    else:
        # 4 steps that do not pay (5 at first: its cost is unknown before its first step), 32 off, and again
        assert 4 <= len(drafter.budgets) <= 1 + 4 * (1 + steps // 36) < steps


@pytest.mark.parametrize("skips_steps", [True, False])
def test_a_sequence_given_no_rows_leaves_a_drafter_that_may_skip_steps_idle(tiny_models, skips_steps):
    # a drafter that claims its nodes are never right gets no rows in any step: one that may skip steps is asked
    # for its estimates only (no propose, no observe: idle) and, as those do not pay, rests; one that may not is
    # still proposed to (budget 0) and observes every step. Plain decoding's output either way.
    model = tiny_models["llama"]
    prompt, length = make_prompts()[4], 40
    expected = plain(model, prompt, length)
    drafter = RestingDrafter(prompt + expected, VOCAB, right=1, claimed=0.0)
    drafter.skips_steps = skips_steps
    asked = []
    estimates = drafter.acceptance_estimates
    drafter.acceptance_estimates = lambda context, budget: asked.append(budget) or estimates(context, budget)
    trace = io.StringIO()
    result = decode_alone(model, prompt, length, drafter, StepCost(FLAT, weight=0.0), trace)
    assert result.tokens == expected
    steps = [json.loads(line) for line in trace.getvalue().splitlines() if '"rows"' in line]
    assert len(steps) == result.stats.steps == length and all(s["rows"] == s["sequences"] for s in steps)
    if skips_steps:  # idle every step it is asked; its estimates alone do not pay, so it also rests
        assert drafter.budgets == [] and drafter.observed == 0
        assert all(s["idle"] + s["resting"] == 1 for s in steps) and 0 < len(asked) <= sum(s["idle"] for s in steps)
    else:  # asked every step but the last (one token left: nothing to draft), proposed to and observing every step
        assert len(asked) == length - 1 and drafter.budgets == [0] * length and drafter.observed == length
        assert all(s["idle"] == 0 and s["resting"] == 0 for s in steps)


@pytest.mark.parametrize("field", ["max_batch", "prefill_chunk", "calibration_width"])
def test_scheduler_config_refuses_sizes_below_one(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        SchedulerConfig(**{field: 0})
    with pytest.raises(ValueError, match="calibration_rows"):
        SchedulerConfig(calibration_rows=())
