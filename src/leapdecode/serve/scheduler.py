"""Continuous batching: one background thread runs every admitted sequence, a step at a time.

Each iteration of the loop:
  1. admit waiting sequences into free batch slots, drop cancelled ones (a disconnected client frees its slot here);
  2. one decode step for every sequence past its prefill: choose each sequence's draft length for this batch
     (leapdecode.draft_length), let each sequence's drafter propose, verify all drafts in one forward pass,
     apply the exact acceptance rule per sequence, commit, observe, emit; a sequence given no rows does not
     consult its drafter beyond the estimates (where the drafter may skip steps), and a drafter whose drafts have
     not paid for its own work in the last steps rests for a while (its sequences decode plainly without
     consulting it);
  3. prefill the next chunk (at most `prefill_chunk` prompt tokens) of sequences that just joined, so a long
     prompt delays the running sequences by one chunk per iteration instead of by its whole length; after a step
     that speculated, as many chunks as the step was (by the cost model) longer than a plain one, so joining
     requests are prefilled at the same pace whether or not the running ones speculate.
Sequences join and leave between steps. All torch work happens on this thread; the asyncio side only submits and
cancels sequences and receives their events through each sequence's sink. With a trace file (`leapdecode serve
--trace`) every iteration is written down as one JSON line (_write_trace), for leapdecode.serve.trace to read.

The runner is one of two batched forwards: serve.batch_runner.BatchRunner (transformers' forward, one padded
cache row per sequence) or models.fast.batch.FastBatchRunner (leapdecode's forward, one cache per sequence, no
padding); both offer allocate / release / prefill / verify / commit / span and say whether they pad. Each
sequence keeps its own cache length, positions, mask, drafter, generator and stats (see the runners and Sequence),
so its output is the one it would get alone: identical tokens under greedy decoding, the same distribution under
sampling.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TextIO

import torch

from leapdecode.accept import accept
from leapdecode.drafters.base import Draft, StepResult
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.serve.batch_runner import BatchRunner
from leapdecode.serve.sequence import Failed, Sequence
from leapdecode.draft_length import (DrafterCalibration, DrafterUpkeep, StepCost, choose_draft_length,
                                     own_draft_length, plan_draft_lengths)
from leapdecode.tree import depths

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The waiting queue is full: answer 429 and let the client retry."""


class Unavailable(Exception):
    """The scheduler is not accepting work (starting, draining or stopped): answer 503."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # sequences decoded together (batch slots)
    max_waiting: int = 64  # sequences queued for a slot; beyond this, submissions are refused
    prefill_chunk: int = 128  # prompt tokens prefilled per iteration
    max_draft: int = 32  # longest draft (nodes) any sequence may verify in one step
    calibration_rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)  # step sizes timed at start-up
    calibration_context: int = 128  # tokens in the scratch sequences those steps run on (attention reads them)
    calibration_width: int = 16  # most one-row sequences in the step timed for what each further sequence adds

    def __post_init__(self) -> None:
        for name in ("max_batch", "prefill_chunk", "calibration_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting", "max_draft", "calibration_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.calibration_rows or min(self.calibration_rows) < 1:
            raise ValueError(f"calibration_rows must be non-empty sizes >= 1, got {self.calibration_rows}")


@dataclass
class StepPlan:
    """What the scheduler decided for one decode step, by sequence id."""

    budgets: dict[int, int]  # draft nodes each sequence may propose
    predicted: dict[int, list[float]] = field(default_factory=dict)  # drafters' own estimates, where they make them
    scaled: dict[int, list[float]] = field(default_factory=dict)  # the chances the rows were shared out by
    resting: set[int] = field(default_factory=set)  # sequences whose drafter sits this step out (DrafterUpkeep)
    idle: set[int] = field(default_factory=set)  # sequences given no rows whose drafter then skips propose, observe
    upkeep: dict[int, float] = field(default_factory=dict)  # seconds each drafter has spent on this step so far

    def consults(self, seq_id: int) -> bool:
        """Whether the sequence's drafter proposes and observes this step."""
        return seq_id not in self.resting and seq_id not in self.idle


class Scheduler:
    def __init__(self, runner: BatchRunner | FastBatchRunner, config: SchedulerConfig, metrics=None,
                 cost: StepCost | None = None, trace: TextIO | None = None) -> None:
        if runner.max_batch != config.max_batch:
            raise ValueError(f"runner has {runner.max_batch} slots but config.max_batch is {config.max_batch}")
        self.runner, self.config, self.metrics, self.cost = runner, config, metrics, cost
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the loop itself died
        self.last_draft_length = 0  # the longest draft offered in the last decode step (for metrics and tests)
        self._calibrations: defaultdict[str, DrafterCalibration] = defaultdict(DrafterCalibration)  # per drafter
        self._upkeep: defaultdict[str, DrafterUpkeep] = defaultdict(DrafterUpkeep)  # per drafter
        self.trace = trace  # a text file that gets one JSON line per iteration (see _iteration), or None
        self._step: dict = {}  # what the current iteration did, for the trace

    # ------------------------------------------------------------------------------------------ control (any thread)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def healthy(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Calibrate the step cost (unless given), then start the loop thread."""
        if self.cost is None:
            self.cost = calibrate(self.runner, self.config)
        self._thread = threading.Thread(target=self._loop, name="leapdecode-scheduler", daemon=True)
        with self._cond:
            self._accepting = True
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is not accepting requests (shutting down)")
            # count the running ones too: submissions wait briefly in the queue even when slots are free
            if len(self._waiting) + len(self._running) >= self.config.max_batch + self.config.max_waiting:
                raise Overloaded(f"{len(self._running)} requests running and {len(self._waiting)} waiting "
                                 f"(limits {self.config.max_batch} and {self.config.max_waiting}); retry later")
            self._waiting.append(seq)
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the loop drops the sequence before its next step."""
        seq.cancel()
        with self._cond:
            self._cond.notify_all()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> bool:
        """Refuse new work; with drain, let admitted and queued sequences finish (up to `timeout` seconds), then
        cancel what is left and end the loop. True when everything finished without being cancelled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while drain and (self._waiting or self._running) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            clean = not (self._waiting or self._running)
            for seq in list(self._waiting) + self._running:
                seq.cancel()
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        return clean

    # ------------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._stopping):
                        self._cond.wait()
                    if self._stopping and not (self._waiting or self._running):
                        return
                self._iteration()
                with self._cond:
                    self._cond.notify_all()  # stop() waits for the queues to empty
        except BaseException as exc:  # a bug or an unrecoverable device error: fail everyone, refuse new work
            logger.exception("scheduler loop died")
            self.error = exc
            with self._cond:
                self._accepting = False
                pending = list(self._waiting) + self._running
                self._waiting.clear()
                self._running.clear()
                self._cond.notify_all()
            for seq in pending:
                seq.state = "done"
                seq.sink(Failed(500, f"internal error: {exc}"))

    def _iteration(self) -> None:
        begin = time.perf_counter()
        self._step = {}
        self._admit()
        self._drop_cancelled()
        decoding = [seq for seq in self._running if seq.state == "decode"]
        stretch = self._decode_step(decoding) if decoding else 1.0
        t0 = time.perf_counter()
        prefilled = self._prefill(round(self.config.prefill_chunk * stretch))
        if self.trace is not None:
            self._write_trace(begin, prefilled, time.perf_counter() - t0)

    def _write_trace(self, begin: float, prefilled: int, prefill_seconds: float) -> None:
        """One JSON line per iteration: when it began (seconds on the monotonic clock), how many sequences decoded
        and prefilled, and for the decode step the rows computed, the cost model's price of that step and of a plain
        one against the measured forward, the cost model's learned factors after it (StepCost.load, row_load), the
        tokens the drafts were expected to add against those accepted, and the drafters' own seconds (choosing
        lengths, proposing, observing) and the rest of the step's (acceptance, commit, emitting). Read it with
        leapdecode.serve.trace (scripts/trace_summary.py)."""
        line = {"t": round(begin, 4), "running": len(self._running), "prefill_tokens": prefilled,
                "prefill_s": round(prefill_seconds, 5), "iteration_s": round(time.perf_counter() - begin, 5)}
        line.update(self._step)
        self.trace.write(json.dumps(line) + "\n")
        self.trace.flush()

    def _admit(self) -> None:
        admitted, dropped = [], []
        with self._cond:
            while self._waiting and self.runner.free_slots:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    dropped.append(seq)
                    continue
                seq.slot, seq.state = self.runner.allocate(), "prefill"
                self._running.append(seq)
                admitted.append(seq)
        for seq in dropped:
            self._report(seq, seq.finish("cancelled"))
        for seq in admitted:
            try:
                seq.drafter.reset(list(seq.prompt), seq.config.sampling)
            except Exception as exc:  # a drafter bug fails its own request only
                self._fail(seq, 500, f"drafter {seq.drafter.name!r} failed to start: {exc}")

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [seq for seq in self._waiting if seq.cancelled]
            for seq in dropped:
                self._waiting.remove(seq)
        for seq in dropped:
            self._report(seq, seq.finish("cancelled"))
        for seq in [seq for seq in self._running if seq.cancelled]:
            self._release(seq)
            self._report(seq, seq.finish("cancelled"))

    def _prefill(self, budget: int) -> int:
        """Feed up to `budget` prompt tokens of joining sequences; those done move on to decoding. Returns the tokens
        fed."""
        fed = 0
        for seq in [seq for seq in self._running if seq.state == "prefill"]:
            todo = seq.prompt[seq.prefilled : len(seq.prompt) - 1]  # the root (last prompt token) is not prefilled
            if todo and budget:
                chunk = todo[:budget]
                start = time.perf_counter()
                try:
                    self.runner.prefill(seq.slot, chunk)
                except Exception as exc:
                    self._fail(seq, 500, f"prefill failed: {exc}")
                    continue
                seq.stats.prefill_seconds += time.perf_counter() - start
                seq.prefilled += len(chunk)
                budget -= len(chunk)
                fed += len(chunk)
            if seq.prefilled == len(seq.prompt) - 1:
                seq.state = "decode"
            if not budget:
                break
        return fed

    def _decode_step(self, batch: list[Sequence]) -> float:
        """One step for every sequence in `batch`. Returns how many times longer the step is expected to take than a
        plain one for the same batch (at least 1): the next prefill gets that many chunks, so joining requests are
        prefilled at the same pace whether or not the running ones speculate."""
        # 1. how much each sequence may draft (adaptive lengths; reproducible requests decide alone)
        t_choose = time.perf_counter()
        plan = self._draft_lengths(batch)
        budgets, predicted, scaled, upkeep = plan.budgets, plan.predicted, plan.scaled, plan.upkeep
        t_propose = time.perf_counter()
        self.last_draft_length = max(budgets.values(), default=0)
        # 2. guess (a resting or idle drafter is not consulted: plain decoding)
        entries: list[tuple[Sequence, Draft]] = []
        for seq in batch:
            budget = budgets[seq.id]
            if not plan.consults(seq.id):
                entries.append((seq, Draft.empty()))
                continue
            t0 = time.perf_counter()
            try:
                draft = seq.drafter.propose(seq.context, budget)
                if draft.n > budget:
                    raise RuntimeError(f"proposed {draft.n} nodes over a budget of {budget}")
            except Exception as exc:
                self._fail(seq, 500, f"drafter {seq.drafter.name!r} failed: {exc}")
                continue
            seconds = time.perf_counter() - t0
            seq.stats.drafter_seconds += seconds
            upkeep[seq.id] = upkeep.get(seq.id, 0.0) + seconds
            entries.append((seq, draft))
        if not entries:
            return 1.0
        # 3. one forward pass over every sequence's root and draft
        t1 = time.perf_counter()
        self._step.update(sequences=len(entries), drafters=sorted({seq.drafter.name for seq, _ in entries}),
                          resting=len(plan.resting), idle=len(plan.idle), choose_s=round(t_propose - t_choose, 5),
                          propose_s=round(t1 - t_propose, 5))
        try:
            logits = self.runner.verify([(seq.slot, seq.root, draft) for seq, draft in entries])
        except Exception as exc:
            logger.exception("batched verification failed")
            for seq, _ in entries:
                self._fail(seq, 500, f"verification failed: {exc}")
            return 1.0
        seconds = time.perf_counter() - t1
        rows = [row.shape[0] for row in logits]
        width = self.runner.span([seq.slot for seq, _ in entries])
        computed = width * max(rows) if self.runner.padded else sum(rows)
        priced, plain = self.cost.estimate(computed, width), self.cost.estimate(width, width)
        self.cost.observe(computed, seconds, width)
        stretch = max(1.0, priced / plain)
        self._step.update(rows=computed, forward_s=round(seconds, 5), priced_s=round(priced, 5),
                          plain_s=round(plain, 5), load=round(self.cost.load, 4),
                          row_load=round(self.cost.row_load, 4), expected=0.0, accepted=0)
        if self.metrics is not None:
            self.metrics.on_batch(len(entries), self.last_draft_length)
        # 4. per sequence: exact acceptance, commit, observe, emit
        t_accept = time.perf_counter()
        observe_seconds = emit_seconds = 0.0
        done = []
        for (seq, draft), seq_logits in zip(entries, logits):
            t2 = time.perf_counter()
            try:
                acceptance = accept(draft, seq_logits[: draft.n + 1], seq.config.sampling, seq.generator)
                self.runner.commit(seq.slot, acceptance.path)
                emitted = draft.tokens[acceptance.path].tolist() + [acceptance.bonus]
                if plan.consults(seq.id):
                    t3 = time.perf_counter()
                    seq.drafter.observe(StepResult(seq.root, draft, seq_logits, acceptance.path, acceptance.bonus,
                                                   emitted))
                    observed = time.perf_counter() - t3
                    observe_seconds += observed
                    self._upkeep[seq.drafter.name].observe(upkeep.get(seq.id, 0.0) + observed)
            except Exception as exc:
                self._fail(seq, 500, f"step failed: {exc}")
                continue
            depth = max(depths(draft.parents), default=0)
            seq.stats.record_step(depth, draft.n, len(acceptance.path))
            seq.stats.target_seconds += seconds
            seq.stats.drafter_seconds += time.perf_counter() - t2
            seq.estimate.observe(budgets[seq.id], depth, len(acceptance.path))
            if seq.id in predicted and draft.n:  # its estimates against the outcome
                self._calibrations[seq.drafter.name].observe(sum(predicted[seq.id][: draft.n]), len(acceptance.path))
            if self.trace is not None:
                self._step["expected"] = round(self._step["expected"] + sum(scaled.get(seq.id, [])[: draft.n]), 4)
                self._step["accepted"] += len(acceptance.path)
            before = seq.stats.new_tokens
            t4 = time.perf_counter()
            finished = seq.emit(emitted)
            emit_seconds += time.perf_counter() - t4
            if self.metrics is not None:
                self.metrics.on_step(depth, draft.n, len(acceptance.path), seq.stats.new_tokens - before)
            if finished:
                done.append(seq)
        self._step.update(accept_s=round(time.perf_counter() - t_accept, 5), observe_s=round(observe_seconds, 5),
                          emit_s=round(emit_seconds, 5))
        for seq in done:
            self._release(seq)
            self._report(seq, seq.finish())
        return stretch

    def _draft_lengths(self, batch: list[Sequence]) -> StepPlan:
        """Each sequence's draft budget for this step (see StepPlan). A padded runner offers every adaptive sequence
        one common length (the step is as wide as its widest sequence anyway); one without padding sizes each
        sequence's draft by its nodes' chances (draft_length.plan_draft_lengths), lets a drafter that may skip
        steps skip this one where its sequence gets no rows (idle: its estimates were all it cost), and lets
        drafters whose work does not pay for itself rest (draft_length.DrafterUpkeep). Reproducible requests decide
        from their own history."""
        caps = [max(0, min(seq.config.budget, seq.remaining - 1, self.config.max_draft)) for seq in batch]
        plan = StepPlan({seq.id: own_draft_length(seq.estimate, cap, self.config.max_draft)
                         for seq, cap in zip(batch, caps) if seq.reproducible})
        fixed = [(seq.estimate, plan.budgets[seq.id]) for seq in batch if seq.reproducible]
        adaptive = [(seq, cap) for seq, cap in zip(batch, caps) if not seq.reproducible]
        if self.runner.padded:
            width = self.runner.span([seq.slot for seq in batch])  # sequences the pass computes (with padding ones)
            k = choose_draft_length([seq.estimate for seq, _ in adaptive], [cap for _, cap in adaptive], width,
                                    self.cost, self.config.max_draft, fixed, padded=True)
            plan.budgets.update({seq.id: min(k, cap) for seq, cap in adaptive})
            plan.scaled.update({seq.id: seq.estimate.gains(min(k, cap)) for seq, cap in adaptive})
            return plan
        resting = {name for name in {seq.drafter.name for seq, _ in adaptive} if self._upkeep[name].rest()}
        gains = []
        for seq, cap in adaptive:
            if seq.drafter.name in resting and getattr(seq.drafter, "skips_steps", False):
                plan.resting.add(seq.id)
                gains.append([])
                continue
            t0 = time.perf_counter()
            own = self._drafter_estimates(seq, cap)
            plan.upkeep[seq.id] = time.perf_counter() - t0
            if own is None:
                gains.append(seq.estimate.gains(cap))
            else:
                plan.predicted[seq.id] = own
                scale = self._calibrations[seq.drafter.name].factor
                gains.append([min(p * scale, 1.0) for p in own])
        rows = plan_draft_lengths(gains, self.cost, fixed)
        plan.budgets.update({seq.id: k for (seq, _), k in zip(adaptive, rows.lengths)})
        plan.scaled.update({seq.id: g for (seq, _), g in zip(adaptive, gains)})
        for (seq, _), k in zip(adaptive, rows.lengths):  # no rows: a drafter that may skip steps skips this one
            if k == 0 and seq.id not in plan.resting and getattr(seq.drafter, "skips_steps", False):
                plan.idle.add(seq.id)
                self._upkeep[seq.drafter.name].observe(plan.upkeep.get(seq.id, 0.0))  # its estimates alone
        # do the drafts pay for the drafters' own work? (only drafters that may rest are judged)
        judged = [seq for seq, _ in adaptive if seq.id not in plan.resting and getattr(seq.drafter, "skips_steps",
                                                                                        False)]
        if judged:
            upkeep = sum(self._upkeep[seq.drafter.name].seconds or 0.0 for seq in judged)
            pays = rows.tokens / (rows.seconds + upkeep) > rows.plain_tokens / rows.plain_seconds
            for name in {seq.drafter.name for seq in judged}:
                self._upkeep[name].judge(pays)
        return plan

    @staticmethod
    def _drafter_estimates(seq: Sequence, cap: int) -> list[float] | None:
        """The acceptance chance of each node the sequence's drafter could draft now, most likely first
        (Drafter.acceptance_estimates), or None where it makes no estimates. The server scales them by how well
        that drafter's estimates have matched what the target accepted (DrafterCalibration)."""
        estimates = getattr(seq.drafter, "acceptance_estimates", None)
        if estimates is None or cap == 0:
            return None
        try:
            return [min(max(float(p), 0.0), 1.0) for p in estimates(seq.context, cap)][:cap]
        except Exception:  # a drafter bug: its propose will fail the request; the batch goes on
            logger.exception("drafter %r could not estimate its acceptance", seq.drafter.name)
            return None

    # ---------------------------------------------------------------------------------------------- endings

    def _release(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot is not None:
            self.runner.release(seq.slot)
            seq.slot = None

    def _fail(self, seq: Sequence, status: int, message: str) -> None:
        logger.error("request %d failed: %s", seq.id, message)
        self._release(seq)
        seq.state = "done"
        seq.sink(Failed(status, message))
        if self.metrics is not None:
            self.metrics.on_failed()

    def _report(self, seq: Sequence, result) -> None:
        if self.metrics is not None:
            self.metrics.on_finish(seq, result)


def calibrate(runner: BatchRunner | FastBatchRunner, config: SchedulerConfig) -> StepCost:
    """The step cost model, timed on scratch sequences of `runner` holding `calibration_context` tokens, as requests
    do: one sequence's step at each of `calibration_rows` (the best of three each), then a step of one-row
    sequences, as many as the server runs (up to `calibration_width`), for what each further sequence adds. That
    cost is a difference of two step times shared among the sequences: from 4 sequences, six calibrations in a row
    on the 2-core development machine priced a plain 16-sequence step at 35.2-45.9 ms, from 16 at 38.7-40.8
    (scripts/calibration_check.py, BENCHMARKS.md 0i). The scratch slots must be free; they are given back."""
    width = min(config.max_batch, config.calibration_width)
    room = runner.max_positions - max(config.calibration_rows) - 4 * len(config.calibration_rows) - 8
    context = max(0, min(config.calibration_context, room))  # every timed step must fit after it
    slots = []
    try:
        slots += [runner.allocate() for _ in range(width)]
        for slot in slots:
            if context:
                runner.prefill(slot, [0] * context)
        time_step(runner, slots[:1], 1)  # warm-up: first-call allocations
        cost = StepCost({n: min(time_step(runner, slots[:1], n) for _ in range(3)) for n in config.calibration_rows})
        if width > 1:
            seconds = min(time_step(runner, slots, 1) for _ in range(3))
            cost.per_sequence = max(seconds - cost.curve(width), 0.0) / (width - 1)  # `width` rows in all
        return cost
    finally:
        for slot in slots:
            runner.release(slot)


def time_step(runner: BatchRunner | FastBatchRunner, slots: list, rows: int) -> float:
    """Seconds of one verification pass of `rows` rows for each of `slots` (held by the caller; for the cost
    model). Only the roots are kept: each sequence grows by one token."""
    begin = time.perf_counter()
    runner.verify([(slot, 0, Draft.chain([0] * (rows - 1))) for slot in slots])
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)  # the pass, not just its launch
    seconds = time.perf_counter() - begin
    for slot in slots:
        runner.commit(slot, [])
    return seconds
