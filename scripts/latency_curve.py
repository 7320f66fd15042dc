"""Measure (and cache) the target's verify-latency curve on this machine and print it: ms per step by draft nodes.

    .venv/bin/python scripts/latency_curve.py [--model smollm2-135m-instruct] [--runner auto|hf|fast]

This is the curve the `auto` budgets (recycling, hybrid) and pld's adaptive draft length read from the cache; the
measurement here always runs afresh (remeasure) and overwrites the cached one for the default runner.

    .venv/bin/python scripts/latency_curve.py --compare-kernel [--rounds 5]

measures the fast CPU runner twice in one process, with the skinny kernel (models/fast/skinny.py) and with torch's
products only, alternating whole curves `--rounds` times, and prints the median of each and their ratio: how much
faster a step of each size is with the kernel. It does not touch the cache.
"""

from __future__ import annotations

import argparse

import statistics

from leapdecode import load_model
from leapdecode.budget import DEFAULT_SIZES, cached_latency_curve, measure_latency
from leapdecode.models.fast import FastConfig, FastRunner, skinny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runner", default="auto", choices=["auto", "hf", "fast"])
    ap.add_argument("--context", type=int, default=256, help="prefilled tokens before the timed steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-kernel", action="store_true",
                    help="time the fast CPU runner with and without the skinny kernel, alternating")
    ap.add_argument("--rounds", type=int, default=5, help="alternations for --compare-kernel")
    args = ap.parse_args()
    model = load_model(args.model)
    if args.compare_kernel:
        compare_kernel(model, args)
        return
    if args.runner == "auto":
        curve = cached_latency_curve(model, repeats=args.repeats, context_len=args.context, remeasure=True)
    else:
        curve = measure_latency(model.runner(args.runner), DEFAULT_SIZES, args.repeats, args.context)
    print(f"{model.name} · runner {model.runner_kind(args.runner)} · context {args.context}")
    ms = curve.as_ms()
    print("nodes | " + " | ".join(ms))
    print("ms    | " + " | ".join(f"{v:.1f}" for v in ms.values()))
    print("x one-token step | " + " | ".join(f"{v / ms['0']:.2f}" for v in ms.values()))


def compare_kernel(model, args) -> None:
    reason = skinny.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the skinny kernel is unavailable here: {reason}")
    if model.device.type != "cpu":
        raise SystemExit(f"--compare-kernel is for the CPU; the model is on {model.device}")
    runners = {"torch products": FastRunner(model.hf_model, FastConfig(cpu_kernel=False)),
               "skinny kernel": FastRunner(model.hf_model, FastConfig(cpu_kernel=True))}
    curves = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            curves[name].append(measure_latency(runner, DEFAULT_SIZES, args.repeats, args.context).as_ms())
    print(f"{model.name} · fast runner on the CPU · context {args.context} · median of {args.rounds} alternating "
          f"curves, ms per step by draft nodes")
    medians = {name: {k: statistics.median(c[k] for c in cs) for k in cs[0]} for name, cs in curves.items()}
    sizes = list(medians["torch products"])
    print("| nodes | " + " | ".join(sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name, ms in medians.items():
        print(f"| {name} ms | " + " | ".join(f"{v:.1f}" for v in ms.values()) + " |")
        print(f"| {name}, x its one-token step | " + " | ".join(f"{v / ms['0']:.2f}" for v in ms.values()) + " |")
    old, new = medians["torch products"], medians["skinny kernel"]
    print("| torch / skinny (speed-up) | " + " | ".join(f"{old[k] / new[k]:.2f}" for k in sizes) + " |")


if __name__ == "__main__":
    main()
