"""Does the server's start-up cost model price a step of many sequences right on this machine?

    .venv/bin/python scripts/calibration_check.py [--model smollm2-135m-instruct] [--batch 16] [--widths 4,16]
        [--times 3]

Runs the server's calibration (leapdecode.serve.scheduler.calibrate) `--times` times for each calibration width
(how many one-row sequences the step that measures each further sequence's cost has), and prints each one's cost
per further sequence and its price of a plain step of `--batch` one-row sequences, next to that step timed
directly (best of 5, the same scratch context). A width whose prices scatter or sit far from the timed step makes
the server misjudge what a drafted row is worth against a plain step (BENCHMARKS.md section 0i).
"""

from __future__ import annotations

import argparse
import dataclasses

from leapdecode import load_model
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.serve.scheduler import SchedulerConfig, calibrate, time_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16, help="sequences of the plain step priced and timed")
    ap.add_argument("--widths", default="4,16", help="calibration widths to compare, comma-separated")
    ap.add_argument("--times", type=int, default=3, help="calibrations per width")
    args = ap.parse_args()
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise SystemExit(f"--widths takes comma-separated integers, e.g. 4,16; got {args.widths!r}") from None
    if args.batch < 1 or args.times < 1 or min(widths) < 1:
        raise SystemExit("need --batch, --times and every width >= 1")
    try:
        model = load_model(args.model)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    runner = FastBatchRunner(model.runner("fast"), max(args.batch, *widths))
    base = SchedulerConfig(max_batch=runner.max_batch)
    print(f"{args.model} · plain step of {args.batch} one-row sequences of {base.calibration_context} tokens")
    print("| calibration width | per further sequence ms | priced ms |")
    print("|---|---|---|")
    for width in widths:
        config = dataclasses.replace(base, calibration_width=width)
        for _ in range(args.times):
            cost = calibrate(runner, config)
            print(f"| {width} | {1e3 * cost.per_sequence:.2f} | {1e3 * cost.estimate(args.batch, args.batch):.1f} |")
    slots = [runner.allocate() for _ in range(args.batch)]
    for slot in slots:
        runner.prefill(slot, [0] * base.calibration_context)
    seconds = min(time_step(runner, slots, 1) for _ in range(5))
    print(f"timed directly: {1e3 * seconds:.1f} ms")


if __name__ == "__main__":
    main()
