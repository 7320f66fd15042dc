"""The server's scheduler without HTTP, for deciding how it should size and share drafts: MAT and a modelled
throughput of the batching loop at a concurrency, with a latency curve measured on another machine.

    # on a GPU (float32: the same greedy tokens as the CPU), modelling this 2-core CPU's step cost
    python3 scripts/serve_sim.py --device cuda --curve .gpu_data/cpu_curve.json --drafter hybrid \
        --concurrency 1,4,16 --requests 16 --max-tokens 64

Requests (greedy, chat template, first turns of Spec-Bench round-robin over categories, as `leapdecode loadgen`)
go through leapdecode.serve.scheduler.Scheduler with the batched fast forward. The step cost the scheduler plans
with is the curve ({nodes: ms} of one sequence; rows beyond its end grow in proportion), frozen, so its choices are
the ones it would make on the machine the curve was measured on; the modelled time of a level is the sum of that
cost over the steps it ran, plus the drafters' own time. A variant is how requests get drafters:

- fresh:  a new drafter per request (`leapdecode serve`'s default)
- shared: forks of one drafter (Drafter.fork; `leapdecode serve --share-drafter-state`)

Every variant's texts are compared with plain decoding's (drafter none) for the same requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from leapdecode.decode import GenerationConfig
from leapdecode.draft_length import StepCost
from leapdecode.drafters.registry import info, make_drafter, parse_options
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.models.load import load_model
from leapdecode.serve.loadgen import load_prompts
from leapdecode.serve.scheduler import Scheduler, SchedulerConfig
from leapdecode.serve.sequence import Failed, Finished, Sequence, TextAssembler
from measure_drafters import plant_curve  # scripts/ is on sys.path when this script runs

VARIANTS = ("fresh", "shared")


class RowRecorder:
    """The batched runner, noting the rows of every verification pass (for the modelled time)."""

    def __init__(self, runner: FastBatchRunner) -> None:
        self.runner, self.rows = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def verify(self, entries):
        self.rows.append(sum(1 + draft.n + draft.m for _, _, draft in entries))
        return self.runner.verify(entries)


def run_level(model, runner, cost, drafters, prompts, concurrency, max_tokens, max_draft):
    """All prompts through one scheduler, `concurrency` in flight; (texts, MATs, modelled seconds, wall)."""
    recorder = RowRecorder(runner)
    scheduler = Scheduler(recorder, SchedulerConfig(max_batch=runner.max_batch, max_draft=max_draft), None, cost)
    scheduler.start()
    results: list[Finished | None] = [None] * len(prompts)
    slots = threading.Semaphore(concurrency)
    done = threading.Event()
    left = [len(prompts)]
    lock = threading.Lock()
    drafter_seconds = [0.0]

    def sink_for(i):
        def sink(event):
            if isinstance(event, Finished):
                results[i] = event
                with lock:
                    drafter_seconds[0] += event.stats.drafter_seconds
                    left[0] -= 1
                    if not left[0]:
                        done.set()
                slots.release()
            elif isinstance(event, Failed):
                print(f"request {i} failed: {event.message}", file=sys.stderr)
                os._exit(1)
        return sink

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        slots.acquire()
        config = GenerationConfig(max_new_tokens=max_tokens, budget=max_draft)
        scheduler.submit(Sequence(ids, config, drafters(i), sink_for(i), TextAssembler(model.decode),
                                  eos_token_ids=model.eos_token_ids, device=runner.device))
    done.wait()
    wall = time.perf_counter() - start
    scheduler.stop(drain=True)
    modelled = sum(cost.estimate(r) for r in recorder.rows) + drafter_seconds[0]
    return results, modelled, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset name or .gguf path (default: the default preset)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--curve", required=True, help="latency curve JSON {nodes: ms} of one sequence")
    ap.add_argument("--drafter", default="hybrid", help="name[:key=value...]")
    ap.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable (default: all)")
    ap.add_argument("--concurrency", default="1", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=32)
    ap.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: the repository's)")
    args = ap.parse_args()

    model = load_model(args.model, device=args.device, dtype="float32")
    curve = plant_curve(model, Path(args.curve))  # drafters with tree_budget=auto read it
    cost = StepCost({n + 1: sec for n, sec in zip(curve.sizes, curve.seconds)}, weight=0.0)

    name, _, opts = args.drafter.partition(":")
    options = parse_options(opts.split(":") if opts else [])
    if "adaptive" in info(name).options:  # as the server: the scheduler sizes the drafts
        options["adaptive"] = "false"
    context = {"target": model, "device": str(model.device), "dtype": "float32"}
    texts = load_prompts("spec-bench", args.data, args.requests)
    prompts = [model.encode([{"role": "user", "content": t}], chat=True) for t in texts]
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = args.variant or list(VARIANTS)
    runner = FastBatchRunner(model.runner("fast"), max(levels))

    print(f"model {model.name} on {model.device}; curve {args.curve}; {len(prompts)} requests x {args.max_tokens} "
          f"tokens; drafter {args.drafter}", file=sys.stderr)
    rows = []
    for level in levels:
        base, base_time, _ = run_level(model, runner, cost, lambda i: make_drafter("none", {}, **context), prompts,
                                       level, args.max_tokens, args.max_draft)
        base_tokens = sum(len(r.tokens) for r in base)
        rows.append((level, "none", 1.0, base_tokens / base_time, 1.0, len(prompts)))
        for variant in variants:
            shared = make_drafter(name, options, **context) if variant == "shared" else None

            def drafters(i, shared=shared):
                return shared.fork() if shared is not None else make_drafter(name, options, **context)

            results, modelled, wall = run_level(model, runner, cost, drafters, prompts, level, args.max_tokens,
                                                args.max_draft)
            tokens = sum(len(r.tokens) for r in results)
            steps = sum(r.stats.steps for r in results)
            same = sum(a.tokens == b.tokens for a, b in zip(results, base))
            rows.append((level, variant, tokens / max(steps, 1), tokens / modelled, tokens / modelled /
                         (base_tokens / base_time), same))
            print(f"c={level} {variant}: {wall:.1f} s wall", file=sys.stderr)
    print(f"| concurrency | variant | MAT | modelled tok/s | x none | identical to none |")
    print("|---|---|---|---|---|---|")
    for level, variant, mat, tps, x, same in rows:
        print(f"| {level} | {variant} | {mat:.2f} | {tps:.1f} | {x:.2f}x | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
