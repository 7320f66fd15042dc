"""How much copy chains can gain when each drafted row costs a given share of a token: the ceiling at a batch size.

    .venv/bin/python scripts/chain_ceiling.py [--model smollm2-135m-instruct] [--suite spec-bench] [--prompts 64]
        [-n 128] [--prices 0,0.1,0.2,0.3,0.4,0.5,0.6] [--chains auto] [--out DIR | --corpus corpus.jsonl]

A drafted row is nearly free for one sequence on a memory-bound step and costs about 0.6 of an emitted token in a
16-sequence step on the 2-core development CPU (scripts/step_profile.py --batch 16 --nodes 0,1,2; BENCHMARKS.md
0h). This script lets the target answer the prompts `leapdecode loadgen` sends (first turns of the suite,
round-robin over its categories; greedy, batched transformers generate, so an answer may differ from leapdecode's
at a near-tie, which does not matter for these counts) and decodes each answer again with hybrid's copy chain as
the only draft (leapdecode.drafters.chain_stats.chain_walk), at each price:

- planned: the chain's length chosen per step from the shipped chain rates (chains.json) as the server chooses
  for one sequence, the k that maximises (1 + expected accepted) / (1 + price x k);
- oracle: exactly the chain tokens that are right (per step, no estimate of these chains does better; none at a
  price of 1 or more).

It prints per price the decode speed-up over plain decoding (tokens / (steps + price x drafted rows)), tokens per
step, drafted rows per step and how many of them were accepted. Drafters' own time, prefill and the recycling
tree are left out, and the chain rates stay as shipped (a server's hybrid also learns from each request's own
steps): the figures bound what copy chains can add to a step of that price, before any overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from leapdecode.drafters.chain_stats import MAX_RATE, chain_walk, load_chain_prior

MAX_NGRAM, MAX_CHAIN = 4, 32  # hybrid's defaults


def answers(model_name: str, suite: str, prompts: int, max_new_tokens: int, batch_size: int, out: Path | None):
    """(prompt ids, greedy answer ids) for loadgen's prompts, and the loaded target."""
    from leapdecode import load_model
    from leapdecode.distill import generate_corpus
    from leapdecode.serve.loadgen import load_prompts

    model = load_model(model_name)
    texts = load_prompts(suite, None, prompts)
    began = time.perf_counter()
    pairs = generate_corpus(model, texts, max_new_tokens, batch_size, progress=lambda n: print(
        f"{n} answers, {time.perf_counter() - began:.0f} s", file=sys.stderr))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
            for text, (p, a) in zip(texts, pairs):
                f.write(json.dumps({"prompt": text, "sampled": False, "prompt_ids": p, "answer_ids": a}) + "\n")
    return pairs, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="spec-bench", help="bench suite whose first turns are the prompts")
    ap.add_argument("--prompts", type=int, default=64, help="distinct prompts (loadgen's default)")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128, help="answer length (loadgen's default)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prices", default="0,0.1,0.2,0.3,0.4,0.5,0.6",
                    help="comma-separated costs of a drafted row, in emitted tokens")
    ap.add_argument("--chains", default="auto", help="chain counts: 'auto' = the ones shipped for --model (loads "
                    "the model to find them), or a path")
    ap.add_argument("--out", type=Path, help="also write the answers to DIR/corpus.jsonl")
    ap.add_argument("--corpus", type=Path, help="read (prompt ids, answer ids) from this corpus.jsonl instead")
    args = ap.parse_args()
    try:
        prices = [float(p) for p in args.prices.split(",")]
    except ValueError:
        raise SystemExit(f"--prices must be comma-separated numbers, got {args.prices!r}") from None
    if min(prices) < 0 or args.prompts < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise SystemExit("need --prices >= 0 and --prompts, -n, --batch-size >= 1")
    if args.corpus is not None and args.out is not None:
        raise SystemExit("--out writes the answers this script generates; with --corpus there are none to write")
    if args.corpus is not None:
        from leapdecode.distill import greedy_pairs

        try:
            pairs = greedy_pairs(args.corpus)
        except ValueError as exc:
            raise SystemExit(f"--corpus {exc}")
        if not any(answer for _, answer in pairs):
            raise SystemExit(f"--corpus {args.corpus}: no greedy answers in it")
        model = None
    else:
        pairs, model = answers(args.model, args.suite, args.prompts, args.max_new_tokens, args.batch_size, args.out)
    chains = args.chains
    if chains == "auto":
        from leapdecode import load_model
        from leapdecode.drafters.shipped import shipped_table

        chains = shipped_table(model if model is not None else load_model(args.model), "chains.json")
        if not chains:
            raise SystemExit(f"no chains.json is shipped for {args.model}; pass --chains PATH")
    try:
        probs = np.cumprod(np.minimum(load_chain_prior(chains, MAX_NGRAM, MAX_CHAIN), MAX_RATE), axis=1)  # [n, d]
    except ValueError as exc:
        raise SystemExit(str(exc))
    print(f"{len(pairs)} answers, {sum(len(a) for _, a in pairs)} tokens; chain rates from {chains}")
    print("| price of a drafted row | planned speed-up | tokens/step | rows/step | accepted/row | steps drafting "
          "| oracle speed-up | oracle tokens/step |")
    print("|---|---|---|---|---|---|---|---|")
    for price in prices:
        plan = chain_walk(pairs, probs, price, max_ngram=MAX_NGRAM, max_chain=MAX_CHAIN)
        best = chain_walk(pairs, probs, price, oracle=True, max_ngram=MAX_NGRAM, max_chain=MAX_CHAIN)
        print(f"| {price:.2f} | {plan.speedup:.3f}x | {plan.tokens / plan.steps:.2f} | {plan.rows / plan.steps:.2f} "
              f"| {plan.accepted / max(plan.rows, 1):.2f} | {plan.drafted / plan.steps:.1%} | {best.speedup:.3f}x "
              f"| {best.tokens / best.steps:.2f} |")


if __name__ == "__main__":
    main()
