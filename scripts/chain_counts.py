"""Count how often the hybrid's copy chains are right in the target's own greedy answers: chains.json.

    .venv/bin/python scripts/chain_counts.py --out DIR [--model smollm2-135m-instruct] [--passages 24]
        [--on-passage 96] [--prompts 136] [-n 256] [--batch-size 58] [--seed 0]
    .venv/bin/python scripts/chain_counts.py --out DIR --corpus corpus.jsonl

The first form lets the target answer a seeded sample of leapdecode's own distill prompts on this machine (a CPU
does it in minutes; none of the prompts comes from a benchmark): `--passages` topic articles, `--on-passage` tasks
on those articles (summaries, questions, translations: where answers copy) and `--prompts` other tasks, greedy, up
to `-n` tokens each. It writes DIR/corpus.jsonl and DIR/chains.json. The second form counts the greedy answers of a
corpus that `leapdecode distill-tables` wrote (which also writes chains.json itself).

chains.json is what the hybrid drafter's chain_prior reads ("auto": the one shipped beside the target's recycling
table, leapdecode/drafters/shipped_tables/<fingerprint>/): per match length and depth, how often a chain was right
(leapdecode.drafters.chain_stats). It only changes what is drafted, never the output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from leapdecode.drafters.chain_stats import chain_counts, write_chain_counts


def sample_corpus(model_name: str, passages: int, on_passage: int, prompts: int, max_new_tokens: int,
                  batch_size: int, seed: int, out: Path) -> tuple[list[tuple[list[int], list[int]]], str]:
    from leapdecode import load_model
    from leapdecode.distill import corpus_prompts, generate_corpus, with_passages

    model = load_model(model_name)
    passage_prompts, other_prompts = corpus_prompts(seed)
    rng = random.Random(seed)
    if passages > len(passage_prompts) or prompts > len(other_prompts):
        raise SystemExit(f"at most {len(passage_prompts)} --passages and {len(other_prompts)} --prompts")
    began = time.perf_counter()
    chosen = rng.sample(passage_prompts, passages)
    pairs = generate_corpus(model, chosen, max_new_tokens, max(passages, 1))
    print(f"{passages} passages in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    tasks = with_passages([model.decode(a) for _, a in pairs], seed)
    if on_passage > len(tasks):
        raise SystemExit(f"at most {len(tasks)} --on-passage tasks for {passages} passages")
    chosen += rng.sample(tasks, on_passage) + rng.sample(other_prompts, prompts)
    pairs += generate_corpus(model, chosen[passages:], max_new_tokens, batch_size, progress=lambda n: print(
        f"{n} answers more, {time.perf_counter() - began:.0f} s", file=sys.stderr))
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for prompt, (p, a) in zip(chosen, pairs):
            f.write(json.dumps({"prompt": prompt, "sampled": False, "prompt_ids": p, "answer_ids": a}) + "\n")
    source = (f"{model_name}'s greedy answers (max {max_new_tokens} tokens) to {passages} passage, {on_passage} "
              f"on-passage and {prompts} other leapdecode distill prompts (seed {seed}), scripts/chain_counts.py")
    return pairs, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for chains.json (and corpus.jsonl)")
    ap.add_argument("--corpus", type=Path, help="count this corpus.jsonl's greedy answers instead of answering")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--passages", type=int, default=24)
    ap.add_argument("--on-passage", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=136)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=58)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-ngram", type=int, default=4, help="longest match counted (the hybrid's max_ngram)")
    ap.add_argument("--max-chain", type=int, default=32, help="deepest chain node counted (the hybrid's max_chain)")
    args = ap.parse_args()
    if min(args.passages, args.on_passage, args.prompts) < 0 or args.passages < 1 or args.max_new_tokens < 1 \
            or args.batch_size < 1 or args.max_ngram < 1 or args.max_chain < 1:
        raise SystemExit("need --passages, -n, --batch-size, --max-ngram, --max-chain >= 1 and the counts >= 0")
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out {str(args.out)!r} exists and is not a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.corpus is not None:
        from leapdecode.distill import greedy_pairs

        try:
            pairs = greedy_pairs(args.corpus)
        except ValueError as exc:
            raise SystemExit(f"--corpus {exc}")
        source = f"the {len(pairs)} greedy answers of {args.corpus.name}, scripts/chain_counts.py --corpus"
    else:
        pairs, source = sample_corpus(args.model, args.passages, args.on_passage, args.prompts, args.max_new_tokens,
                                      args.batch_size, args.seed, args.out)
    at_risk, survived = chain_counts(pairs, args.max_ngram, args.max_chain)
    write_chain_counts(args.out / "chains.json", at_risk, survived, source)
    print(f"{len(pairs)} answers, {sum(len(a) for _, a in pairs)} tokens -> {args.out / 'chains.json'}")
    print("match length n: answer positions with such a match, P(chain right at depth 1, 2, 4, 8)")
    for n in range(1, args.max_ngram + 1):
        rates = survived[n] / at_risk[n].clip(min=1)  # [d] conditional rates
        depth = [rates[: d].prod() for d in (1, 2, 4, 8) if d <= args.max_chain]
        print(f"  n={n}: {int(at_risk[n, 0]):6d}  " + "  ".join(f"{p:.2f}" for p in depth))


if __name__ == "__main__":
    main()
