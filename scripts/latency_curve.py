"""Measure (and cache) the target's verify-latency curve on this machine and print it: ms per step by draft nodes.

    .venv/bin/python scripts/latency_curve.py [--model smollm2-135m-instruct] [--runner auto|hf|fast]

This is the curve the `auto` budgets (recycling, hybrid) and pld's adaptive draft length read from the cache; the
measurement here always runs afresh (remeasure) and overwrites the cached one for the default runner.
"""

from __future__ import annotations

import argparse

from leapdecode import load_model
from leapdecode.budget import DEFAULT_SIZES, cached_latency_curve, measure_latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runner", default="auto", choices=["auto", "hf", "fast"])
    ap.add_argument("--context", type=int, default=256, help="prefilled tokens before the timed steps")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = load_model(args.model)
    if args.runner == "auto":
        curve = cached_latency_curve(model, repeats=args.repeats, context_len=args.context, remeasure=True)
    else:
        curve = measure_latency(model.runner(args.runner), DEFAULT_SIZES, args.repeats, args.context)
    print(f"{model.name} · runner {model.runner_kind(args.runner)} · context {args.context}")
    ms = curve.as_ms()
    print("nodes | " + " | ".join(ms))
    print("ms    | " + " | ".join(f"{v:.1f}" for v in ms.values()))
    print("x one-token step | " + " | ".join(f"{v / ms['0']:.2f}" for v in ms.values()))


if __name__ == "__main__":
    main()
