"""Where a CPU decode or verify step's time goes: ms per step in the matrix products, the attention, the RMS norms
and everything else (embedding, rotary, activations, residual adds, the Python around them), by draft size.

    .venv/bin/python scripts/step_profile.py [--model smollm2-135m-instruct] [--batch 1] [--nodes 0,1,2,4,8,16]
        [--context 256] [--repeats 10]

Each of `--batch` sequences holds `--context` tokens and verifies a chain of k draft nodes per step (k from
`--nodes`; 0 is a plain decode step), all in one forward pass of the fast runner's batched form, as in the server
(models/fast/batch.py). The parts are timed by wrapping the functions forward.py calls for them, so a part's time
includes the Python call around its kernel. Each cell is the median over `--repeats` steps after 3 untimed ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from leapdecode import load_model
from leapdecode.drafters.base import Draft
from leapdecode.models.fast import attend
from leapdecode.models.fast import forward as fw
from leapdecode.models.fast.batch import FastBatchRunner

PARTS = {"products": (fw, "linear"), "attention": (attend, "attend"), "attention (torch)":
         (fw, "attention_per_sequence"), "norms": (fw, "rms_norm")}


def timed(seconds: defaultdict, part: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[part] += time.perf_counter() - start
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=1, help="sequences in each step")
    ap.add_argument("--nodes", default="0,1,2,4,8,16", help="draft nodes per sequence, comma-separated")
    ap.add_argument("--context", type=int, default=256, help="tokens each sequence holds before the timed steps")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    try:
        nodes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        raise SystemExit(f"--nodes takes comma-separated integers, e.g. 0,1,4; got {args.nodes!r}") from None
    if args.batch < 1 or args.context < 2 or args.repeats < 1 or min(nodes) < 0:
        raise SystemExit("need --batch >= 1, --context >= 2, --repeats >= 1 and --nodes >= 0")
    try:
        model = load_model(args.model)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if model.device.type != "cpu":
        raise SystemExit(f"this profile is for the CPU; the model is on {model.device}")
    seconds: defaultdict[str, float] = defaultdict(float)
    for part, (module, name) in PARTS.items():
        setattr(module, name, timed(seconds, part, getattr(module, name)))
    steps_run = (3 + args.repeats) * len(nodes)  # each commits one token: the caches never grow mid-timing
    runner = FastBatchRunner(model.runner("fast"), args.batch, capacity=args.context + steps_run + max(nodes) + 1)
    vocab = runner.vocab_size
    ids = [(7 + 31 * i) % vocab for i in range(args.context + args.batch + max(nodes) + 2)]
    slots = [runner.allocate() for _ in range(args.batch)]
    for i, slot in enumerate(slots):
        runner.prefill(slot, ids[i: i + args.context - 1])
    print(f"{model.name} · {args.batch} sequence(s) of {args.context} tokens · median of {args.repeats} steps, ms")
    print("| draft nodes | rows | step | products | attention | norms | rest |")
    print("|---|---|---|---|---|---|---|")
    for k in nodes:
        batch = [(slot, ids[args.context], Draft.chain(ids[args.context + 1: args.context + 1 + k])) for slot in slots]
        steps: list[dict[str, float]] = []
        for repeat in range(3 + args.repeats):
            seconds.clear()
            start = time.perf_counter()
            runner.verify(batch)
            for slot in slots:
                runner.commit(slot, [])  # keeps the root: the context grows by one token per step
            total = time.perf_counter() - start
            if repeat >= 3:
                steps.append(dict(seconds, step=total))
        median = {part: 1000 * statistics.median(s.get(part, 0.0) for s in steps) for part in (*PARTS, "step")}
        attention = median["attention"] + median["attention (torch)"]
        rest = median["step"] - median["products"] - attention - median["norms"]
        print(f"| {k} | {args.batch * (1 + k)} | {median['step']:.1f} | {median['products']:.1f} | {attention:.1f} "
              f"| {median['norms']:.1f} | {rest:.1f} |")


if __name__ == "__main__":
    main()
