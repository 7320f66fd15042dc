"""`leapdecode distill-tables`: warm drafter tables distilled from the target (see leapdecode.distill).

Writes into --out: corpus.jsonl (every prompt and the target's answer: prompt text, whether the answer was sampled,
answer text, prompt and answer token ids), recycling.pt (for
`recycling` / `hybrid`: `--option recycling.table_path=DIR/recycling.pt`), trigrams.npz (for `aded`:
`--option aded.table=DIR/trigrams.npz`) and target.json (the target's fingerprint and the settings), and prints what
it built. Tables copied into leapdecode/drafters/shipped_tables/<fingerprint>/ become those drafters' default
for that target (see leapdecode.drafters.shipped). On a CPU this takes hours for the default prompt
set; use --device cuda where there is a GPU, or --limit for a small set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("distill-tables")(distill_tables)


def distill_tables(
    out: Path = typer.Option(..., "--out", "-o",
                             help="Directory to write recycling.pt, trigrams.npz, corpus.jsonl and target.json into."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                              help="Preset name, .gguf file or HF model directory: the target the tables serve."),
    device: str = typer.Option("cpu", help="Where the target runs (cpu, cuda)."),
    dtype: str = typer.Option("float32", help="Target dtype (float32, bfloat16, float16)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Longest answer per prompt."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts answered together."),
    samples: int = typer.Option(1, help="Extra sampled answers per prompt (temperature --temperature) besides "
                                        "the greedy one."),
    temperature: float = typer.Option(0.8, help="Temperature of the extra sampled answers."),
    limit: int = typer.Option(0, help="Use only this many prompts of each round (0 = all); for a quick run."),
    top_k: int = typer.Option(8, "--top-k", help="Successors kept per token (recycling) and per context (tri-grams)."),
    seed: int = typer.Option(0, help="Seeds the prompt set and the sampled answers."),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Let the target answer ~1,800 built-in prompts and distil warm drafter tables from what it wrote and predicted.

    Writes into --out: recycling.pt (option table_path of recycling and hybrid), trigrams.npz (option table of aded),
    chains.json (option chain_prior of hybrid: how often copy chains were right in the greedy answers),
    corpus.jsonl and target.json. Tables only choose drafts, never the output. Minutes on a GPU (--device cuda),
    hours on a CPU (try --limit 20 first).
    """
    from leapdecode.cli import fail
    from leapdecode.distill import corpus_prompts, generate_corpus, target_predictions, with_passages
    from leapdecode.drafters.chain_stats import chain_counts, write_chain_counts
    from leapdecode.drafters.recycling import RecyclingTable
    from leapdecode.drafters.shipped import target_fingerprint
    from leapdecode.drafters.trigram import TrigramTable
    from leapdecode.models.load import load_model

    for ok, need, value in ((max_new_tokens >= 1, "--max-new-tokens >= 1", max_new_tokens),
                            (batch_size >= 1, "--batch-size >= 1", batch_size),
                            (samples >= 0, "--samples >= 0", samples),
                            (temperature > 0, "--temperature > 0", temperature), (limit >= 0, "--limit >= 0", limit),
                            (1 <= top_k <= 64, "1 <= --top-k <= 64", top_k)):
        if not ok:
            fail(f"need {need}, got {value}")
    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} exists and is not a directory")
    try:
        with err.status(f"loading {model} on {device} ..."):
            target = load_model(model, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    passage_prompts, prompts = corpus_prompts(seed)
    if limit:
        passage_prompts, prompts = passage_prompts[:limit], prompts[:limit]
    began = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not show_progress) as progress:
        def run(description, prompt_list, temp=0.0, run_seed=seed):
            task = progress.add_task(description, total=len(prompt_list))
            return generate_corpus(target, prompt_list, max_new_tokens, batch_size, temp, run_seed,
                                   progress=lambda n: progress.advance(task, n))

        passages = run("passages", passage_prompts)
        on_passage = with_passages([target.decode(a) for _, a in passages], seed)
        if limit:
            on_passage = on_passage[:limit]
        all_prompts = passage_prompts + prompts + on_passage
        pairs = passages + run("answers (greedy)", prompts + on_passage)
        for k in range(samples):
            pairs += run(f"answers (sampled {k + 1})", all_prompts, temperature, seed + 1 + k)
        labels = all_prompts * (1 + samples)  # the prompt of each pair
        task = progress.add_task("target predictions", total=sum(1 for _, a in pairs if a))
        predictions = target_predictions(target, pairs, top_k, progress=lambda n: progress.advance(task, n))
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for i, (prompt, (p, a)) in enumerate(zip(labels, pairs)):
            f.write(json.dumps({"prompt": prompt, "sampled": i >= len(all_prompts), "answer": target.decode(a),
                                "prompt_ids": p, "answer_ids": a}) + "\n")
    recycling = RecyclingTable.from_predictions(predictions.tokens, predictions.top, predictions.probs,
                                                target.vocab_size, top_k)
    recycling.save(out / "recycling.pt")
    trigrams = TrigramTable.from_sequences([p[-2:] + a for p, a in pairs if a], top_k=top_k)
    trigrams.save(out / "trigrams.npz")
    greedy = pairs[: len(all_prompts)]
    write_chain_counts(out / "chains.json", *chain_counts(greedy),
                       source=f"{model}'s {len(greedy)} greedy answers to leapdecode distill-tables prompts "
                              f"(seed {seed}, limit {limit}, max_new_tokens {max_new_tokens})")
    fingerprint = target_fingerprint(target)
    (out / "target.json").write_text(json.dumps({"model": model, "fingerprint": fingerprint, "answers": len(pairs),
                                                 "max_new_tokens": max_new_tokens, "samples": samples,
                                                 "temperature": temperature, "seed": seed, "limit": limit}, indent=1))
    tokens = sum(len(a) for _, a in pairs)
    err.print(f"{len(pairs)} answers, {tokens} tokens in {time.perf_counter() - began:.0f} s -> "
              f"{out / 'recycling.pt'} ({recycling.filled_rows()} token rows), {out / 'trigrams.npz'} "
              f"({len(trigrams)} contexts, {trigrams.state_bytes() / 2**20:.1f} MiB in memory), "
              f"{out / 'chains.json'}. To make them the default of this target: copy the three into "
              f"src/leapdecode/drafters/shipped_tables/{fingerprint}/")
