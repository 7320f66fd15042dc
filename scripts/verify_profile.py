"""Where a verify step's time goes on this machine: the fast runner's step with k draft nodes, timed and profiled.

    .venv/bin/python scripts/verify_profile.py [--model smollm2-135m-instruct] [--sizes 0,4,8] [--context 256]

Prints the median step time per size and how much of it the skinny CPU kernel's matrix products took (they are
C calls, invisible to torch's profiler), then torch's profiler table (operators by self CPU time, over 5 steps) for
each size, so the extra cost of a several-row step can be attributed (matrix products, attention, the rest).
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from leapdecode import load_model
from leapdecode.drafters.base import Draft
from leapdecode.models.fast import skinny


class KernelClock:
    """Wraps skinny.linear (as cpu.py calls it) to add up the seconds spent in the kernel."""

    def __init__(self) -> None:
        self.seconds, self._linear = 0.0, skinny.linear
        skinny.linear = self

    def __call__(self, x, weight):
        start = time.perf_counter()
        out = self._linear(x, weight)
        self.seconds += time.perf_counter() - start
        return out


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

    clock = KernelClock()
    for size in sizes * 2:  # warm-up
        step(size)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    in_kernel: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.repeats):  # round-robin over the sizes, so a busy moment falls on all of them
        for size in sizes:
            clock.seconds = 0.0
            start = time.perf_counter()
            step(size)
            times[size].append(time.perf_counter() - start)
            in_kernel[size].append(clock.seconds)
    medians = {size: statistics.median(times[size]) * 1000 for size in sizes}
    kernel = {size: statistics.median(in_kernel[size]) * 1000 for size in sizes}
    print(" | ".join(f"{size} nodes: {ms:.1f} ms ({ms / medians[sizes[0]]:.2f}x)" for size, ms in medians.items()))
    if skinny.available():
        print("in the skinny kernel's products: " + " | ".join(
            f"{size} nodes: {kernel[size]:.1f} ms, the rest {medians[size] - kernel[size]:.1f} ms" for size in sizes))
    for size in sizes:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step(size)
        print(f"\n{size} draft nodes, 5 steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
