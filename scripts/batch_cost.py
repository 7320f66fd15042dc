"""What a server step costs on this machine, against the scheduler's model of it.

    .venv/bin/python scripts/batch_cost.py [--model smollm2-135m-instruct] [--widths 1,4,8,16] [--drafts 0,1,2,4]

Builds the server's batched fast forward (models/fast/batch.py) with `max(widths)` sequences, each prefilled with
`--context` tokens of its own, and times verification steps of W sequences with k chain nodes each (W x (1 + k)
rows in all), round-robin over every (W, k), so a busy moment of the machine falls on all of them. Then it
calibrates the cost model as the server does at start-up (serve.scheduler.calibrate: one sequence's step by rows,
plus what each further sequence adds, on scratch sequences holding `--context` tokens) and prints, per (W, k), the
median measured step against the model's estimate and against the one-sequence curve alone (what the server priced
a batch step by before session 7).

With --compare-attention it instead times every (W, k) twice in turn, attending through torch's SDPA (one call per
sequence and layer, as before session 8) and through attend.c (one call per layer for all sequences), on the same
weights and caches, and prints both medians and their ratio. With --compare-padded (a GPU's way, e.g. `--device
cuda`): torch's SDPA once per sequence and layer against once per layer for all sequences over their padded
caches (forward.PaddedBatch, session 13).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leapdecode import load_model
from leapdecode.drafters.base import Draft
from leapdecode.models.fast import attend, kernels
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.serve.scheduler import SchedulerConfig, calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--widths", default="1,4,8,16", help="sequences per step, comma-separated")
    ap.add_argument("--drafts", default="0,1,2,4", help="chain nodes per sequence, comma-separated")
    ap.add_argument("--context", type=int, default=200, help="tokens in each sequence's cache")
    ap.add_argument("--repeats", type=int, default=7)
    compare = ap.add_mutually_exclusive_group()
    compare.add_argument("--compare-attention", action="store_true",
                         help="time torch's SDPA against the attention kernel (attend.c) instead of the cost model")
    compare.add_argument("--compare-padded", action="store_true",
                         help="time SDPA per sequence against one SDPA call over the padded batch, instead of the "
                              "cost model (where attend.c is not used, e.g. --device cuda)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    drafts = [int(k) for k in args.drafts.split(",")]
    try:
        model = load_model(args.model, device=args.device)
    except ValueError as exc:  # an unknown model or device
        raise SystemExit(str(exc)) from None
    batch = FastBatchRunner(model.runner("fast"), max(widths) + 4, capacity=args.context + 64)
    vocab = batch.vocab_size
    slots = [batch.allocate() for _ in range(max(widths))]
    for b, slot in enumerate(slots):
        batch.prefill(slot, [(7 + 31 * i + 101 * b) % vocab for i in range(args.context)])

    def step(width: int, k: int) -> float:  # verify, keep only the roots: each context grows by one token
        entries = [(slots[b], 5, Draft.chain([(11 * j + b) % vocab for j in range(k)])) for b in range(width)]
        start = time.perf_counter()
        batch.verify(entries)
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        seconds = time.perf_counter() - start
        for slot, _, _ in entries:
            batch.commit(slot, [])
        return seconds

    cells = [(w, k) for w in widths for k in drafts]
    for w, k in cells:  # warm-up
        step(w, k)
    if args.compare_attention:
        compare_attention(batch, cells, step, args.repeats)
        return
    if args.compare_padded:
        compare_padded(batch, cells, step, args.repeats)
        return
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


def alternate(cells: list[tuple[int, int]], step, repeats: int, switch) -> dict[tuple[int, int, bool], list[float]]:
    """Seconds of every (W, k) step with switch(False) and switch(True) in turn, `repeats` times each, which of
    the two goes first alternating per repeat."""
    times: dict[tuple[int, int, bool], list[float]] = {(w, k, on): [] for w, k in cells for on in (False, True)}
    for r in range(repeats):
        for w, k in cells:
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                switch(on)
                times[(w, k, on)].append(step(w, k))
    return times


def compare_attention(batch: FastBatchRunner, cells: list[tuple[int, int]], step, repeats: int) -> None:
    weights = batch.weights
    if not weights.cpu_attention or not attend.usable(weights.embed, batch.spec.head_dim, [1]):
        raise SystemExit("the attention kernel is not in use here (not a float32 CPU model, or it did not build: "
                         f"{kernels.unavailable_reason()})")
    times = alternate(cells, step, repeats, lambda on: setattr(weights, "cpu_attention", on))
    weights.cpu_attention = True
    print(f"median of {repeats} per cell, SDPA and attend.c alternating, same weights and caches")
    print("| sequences | nodes each | rows | SDPA ms | attend.c ms | SDPA / attend.c |")
    print("|---:|---:|---:|---:|---:|---:|")
    for w, k in cells:
        sdpa, kernel = (statistics.median(times[(w, k, on)]) * 1000 for on in (False, True))
        print(f"| {w} | {k} | {w * (1 + k)} | {sdpa:.1f} | {kernel:.1f} | {sdpa / kernel:.2f} |")


def compare_padded(batch: FastBatchRunner, cells: list[tuple[int, int]], step, repeats: int) -> None:
    weights = batch.weights
    if weights.cpu_attention:
        raise SystemExit("attend.c does this model's attention here (a float32 model on a CPU where it builds): "
                         "--compare-padded is for torch's attention, e.g. --device cuda")
    times = alternate(cells, step, repeats, lambda on: setattr(weights, "padded_attention", on))
    weights.padded_attention = None
    print(f"{batch.device}, median of {repeats} per cell, per-sequence and padded SDPA alternating, same weights "
          f"and caches")
    print("| sequences | nodes each | rows | per-sequence ms | padded ms | per-sequence / padded |")
    print("|---:|---:|---:|---:|---:|---:|")
    for w, k in cells:
        each, padded = (statistics.median(times[(w, k, on)]) * 1000 for on in (False, True))
        print(f"| {w} | {k} | {w * (1 + k)} | {each:.1f} | {padded:.1f} | {each / padded:.2f} |")


if __name__ == "__main__":
    main()
