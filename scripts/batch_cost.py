"""What a server step costs on this machine, against the scheduler's model of it.

    .venv/bin/python scripts/batch_cost.py [--model smollm2-135m-instruct] [--widths 1,4,8,16] [--drafts 0,1,2,4]

Builds the server's batched fast forward (models/fast/batch.py) with `max(widths)` sequences, each prefilled with
`--context` tokens of its own, and times verification steps of W sequences with k chain nodes each (W x (1 + k)
rows in all), round-robin over every (W, k), so a busy moment of the machine falls on all of them. Then it
calibrates the cost model as the server does at start-up (serve.scheduler.calibrate: one sequence's step by rows,
plus what each further sequence adds, on scratch sequences holding `--context` tokens) and prints, per (W, k), the
median measured step against the model's estimate and against the one-sequence curve alone (what the server priced
a batch step by before session 7).
"""

from __future__ import annotations

import argparse
import statistics
import time

from leapdecode import load_model
from leapdecode.drafters.base import Draft
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.serve.scheduler import SchedulerConfig, calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--widths", default="1,4,8,16", help="sequences per step, comma-separated")
    ap.add_argument("--drafts", default="0,1,2,4", help="chain nodes per sequence, comma-separated")
    ap.add_argument("--context", type=int, default=200, help="tokens in each sequence's cache")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    drafts = [int(k) for k in args.drafts.split(",")]
    model = load_model(args.model)
    batch = FastBatchRunner(model.runner("fast"), max(widths) + 4, capacity=args.context + 64)
    vocab = batch.vocab_size
    slots = [batch.allocate() for _ in range(max(widths))]
    for b, slot in enumerate(slots):
        batch.prefill(slot, [(7 + 31 * i + 101 * b) % vocab for i in range(args.context)])

    def step(width: int, k: int) -> float:  # verify, keep only the roots: each context grows by one token
        entries = [(slots[b], 5, Draft.chain([(11 * j + b) % vocab for j in range(k)])) for b in range(width)]
        start = time.perf_counter()
        batch.verify(entries)
        seconds = time.perf_counter() - start
        for slot, _, _ in entries:
            batch.commit(slot, [])
        return seconds

    cells = [(w, k) for w in widths for k in drafts]
    for w, k in cells:  # warm-up
        step(w, k)
    times: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):
        for cell in cells:
            times[cell].append(step(*cell))
    for slot in slots:  # the calibration's scratch sequences need free slots, as at a server's start
        batch.release(slot)
    config = SchedulerConfig(max_batch=batch.max_batch, calibration_context=args.context)
    calibrated = calibrate(batch, config)
    print(f"model {model.name}, context {args.context} tokens per sequence, median of {args.repeats}; calibrated: "
          f"one-row step {calibrated.curve(1) * 1000:.1f} ms, each further sequence "
          f"{calibrated.per_sequence * 1000:.1f} ms")
    print("| sequences | nodes each | rows | measured ms | model ms | one-sequence curve ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for w, k in cells:
        rows = w * (1 + k)
        print(f"| {w} | {k} | {rows} | {statistics.median(times[(w, k)]) * 1000:.1f} | "
              f"{calibrated.estimate(rows, w) * 1000:.1f} | {calibrated.curve(rows) * 1000:.1f} |")


if __name__ == "__main__":
    main()
