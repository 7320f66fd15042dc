"""Where a verify step's time goes on this machine: the fast runner's step with k draft nodes, timed and profiled.

    .venv/bin/python scripts/verify_profile.py [--model smollm2-135m-instruct] [--sizes 0,4,8] [--context 256]

Prints the median step time per size, then torch's profiler table (operators by self CPU time, over 5 steps) for
each size, so the extra cost of a several-row step can be attributed (matrix products, attention, the rest).
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from leapdecode import load_model
from leapdecode.drafters.base import Draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sizes", default="0,4,8", help="draft nodes per step, comma-separated")
    ap.add_argument("--context", type=int, default=256, help="prefilled tokens before the timed steps")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rows", type=int, default=8, help="operators shown per profile")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runner = load_model(args.model).runner("fast")
    ids = [(7 + 31 * i) % runner.vocab_size for i in range(args.context + 64 + 16 * len(sizes) * args.repeats)]
    runner.reset()
    runner.prefill(ids[: args.context - 1])
    pos = [args.context - 1]

    def step(size: int) -> None:  # verify a chain of `size` nodes, keep only the root: the context grows by one
        runner.verify(ids[pos[0]], Draft.chain(ids[pos[0] + 1 : pos[0] + 1 + size]))
        runner.commit([])
        pos[0] += 1

    for size in sizes * 2:  # warm-up
        step(size)
    medians = {}
    for size in sizes:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(size)
            times.append(time.perf_counter() - start)
        medians[size] = statistics.median(times) * 1000
    print(" | ".join(f"{size} nodes: {ms:.1f} ms ({ms / medians[sizes[0]]:.2f}x)" for size, ms in medians.items()))
    for size in sizes:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step(size)
        print(f"\n{size} draft nodes, 5 steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
