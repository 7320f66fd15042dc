"""Drafter tables distilled from the target itself: a corpus the target writes, and what it predicts along it.

Token Recycling's adjacency table and ADED's tri-gram table start empty and learn while decoding; a table that starts
warm drafts well from the first request. The best teacher of what the target will write is the target: this module

1. builds a set of prompts from its own topic and task lists (writing, role play, reasoning, arithmetic, coding,
   extraction, science, humanities, translation, summarisation, questions, word problems, answering from a passage).
   Tasks that need a passage get one the target wrote in a first round. Nothing comes from any benchmark;
2. lets the target answer every prompt (greedy, optionally also sampled), in batches (`generate_corpus`);
3. runs the target over prompt + answer and keeps its top-k next tokens and their probabilities at every answer
   position (`target_predictions`);
4. turns those into a recycling table (`RecyclingTable.from_predictions`: per token, the successors with the most
   probability summed over its occurrences) and a tri-gram table (`TrigramTable.from_sequences` over the answers).

The tables only decide what is drafted; the acceptance rule decides what is emitted, so they never change output.
`leapdecode distill-tables` (distill_cli.py) runs all of it; a GPU makes it take a minute instead of hours.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

TOPICS = (
    "renewable energy", "the water cycle", "machine learning", "the Roman Empire", "climate change", "photosynthesis",
    "the stock market", "healthy eating", "space exploration", "the French Revolution", "electric cars",
    "social media", "volcanoes", "the human immune system", "cryptocurrency", "urban gardening", "the Olympic Games",
    "quantum computing", "coral reefs", "the printing press", "remote work", "black holes", "honey bees",
    "the Industrial Revolution", "meditation", "3D printing", "the Great Wall of China", "vaccines", "jazz music",
    "recycling plastics", "artificial intelligence ethics", "the Amazon rainforest", "public libraries",
    "the history of the internet", "earthquakes", "coffee production", "video games", "the Renaissance",
    "sleep and memory", "self-driving trucks", "ancient Egypt", "nuclear power", "minimalism", "the Moon landing",
    "online privacy", "dinosaurs", "the human brain", "fast fashion", "the Silk Road", "wind turbines",
    "learning a second language", "antibiotic resistance", "the game of chess", "tea ceremonies", "smartphones",
    "the Cold War", "marathon training", "solar eclipses", "microplastics in the ocean", "the theory of evolution",
    "cloud computing", "Shakespeare's plays", "inflation", "bicycles in cities", "the periodic table", "hurricanes",
    "democracy in ancient Athens", "sustainable fishing", "the invention of the telephone", "robotics in medicine",
    "desert ecosystems", "classical music", "time management", "the Mars rovers", "friendship", "glaciers",
    "small businesses", "the metric system", "wildfires", "open source software",
)

WRITING = (
    "Write a short blog post about {topic}.",
    "Write a persuasive email to a colleague explaining why {topic} matters.",
    "Write a short story in which {topic} plays an important role.",
    "Write a poem about {topic}.",
    "Pretend you are an expert on {topic}. Introduce yourself and describe your daily work.",
    "Imagine you are a tour guide. Give a lively talk about {topic}.",
    "What are the pros and cons of {topic}? Think step by step.",
    "Compare {topic} with {other}. How are they similar and how do they differ?",
    "Explain {topic} to a ten-year-old.",
    "Discuss the historical and cultural significance of {topic}.",
    "What is {topic} and why does it matter?",
    "Give five surprising facts about {topic}.",
    "List the main challenges related to {topic} and suggest a solution for each.",
)

ON_PASSAGE = (
    "Summarize the following article in a few sentences.\n\n{passage}",
    "Extract the key facts from the following text as a bullet list.\n\n{passage}",
    "Translate the following text into {language}.\n\n{passage}",
    "Answer the question using only the context below.\n\nContext: {passage}\n\nQuestion: What does the text say "
    "about {topic}?",
    "Read the text and write three questions a teacher could ask about it, with answers.\n\n{passage}",
)
PASSAGE = "Write an informative article of about 150 words about {topic}."
LANGUAGES = ("German", "French", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese")

CODING = (
    "reverses a string", "checks whether a word is a palindrome", "returns the n-th Fibonacci number",
    "counts the vowels in a sentence", "finds the largest number in a list", "removes duplicates from a list",
    "sorts a list of dictionaries by a key", "merges two sorted lists", "computes the factorial of a number",
    "checks whether a number is prime", "reads a CSV file and prints the average of a column",
    "implements binary search", "converts Celsius to Fahrenheit", "counts word frequencies in a text",
    "flattens a nested list", "validates an email address with a regular expression", "implements a stack class",
    "returns the greatest common divisor of two numbers", "transposes a matrix", "finds all anagrams in a word list",
    "implements bubble sort", "computes the running average of a stream of numbers", "parses a date string",
    "finds the longest common prefix of a list of strings", "implements a simple LRU cache",
)
CODING_PROMPTS = ("Write a Python function that {task}.", "Write a JavaScript function that {task}.",
                  "Write a C++ function that {task}, with a short explanation.")

ITEMS = ("apples", "notebooks", "tickets", "pencils", "cookies", "books", "shirts", "plants")


def _math_prompts(rng: random.Random, count: int) -> list[str]:
    prompts = []
    for _ in range(count):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(100, 999)
        item, n, price = rng.choice(ITEMS), rng.randint(3, 20), rng.randint(2, 15)
        prompts.append(rng.choice((
            f"What is {a} times {b}? Show your work.",
            f"Solve for x: {a}x + {b} = {c}.",
            f"A shop sells {item} for ${price} each. Sam buys {n} of them and pays with a $200 bill. How much change "
            f"does Sam get? Explain step by step.",
            f"A train travels {c} km in {a % 9 + 2} hours. What is its average speed?",
            f"What is {a}% of {c}?",
            f"Tom has {c} {item}. He gives {a} to Anna and then buys {b} more. How many {item} does he have now?",
        )))
    return prompts


def corpus_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(passage prompts, template prompts): the first round asks for one passage per topic; the second round's
    prompts are built with `with_passages` once the passages exist. Deterministic for a seed."""
    rng = random.Random(seed)
    passages = [PASSAGE.format(topic=t) for t in TOPICS]
    prompts = [w.format(topic=t, other=rng.choice(TOPICS)) for t in TOPICS for w in WRITING]
    prompts += [p.format(task=task) for task in CODING for p in CODING_PROMPTS]
    prompts += _math_prompts(rng, 200)
    return passages, prompts


def with_passages(passages: Sequence[str], seed: int = 0) -> list[str]:
    """The passage tasks, each passage (the target's own article about TOPICS[i]) under every ON_PASSAGE task."""
    rng = random.Random(seed + 1)
    return [task.format(passage=text.strip(), topic=topic, language=rng.choice(LANGUAGES))
            for topic, text in zip(TOPICS, passages) for task in ON_PASSAGE if text.strip()]


@torch.inference_mode()
def generate_corpus(model, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 64,
                    temperature: float = 0.0, seed: int = 0, progress=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) for each prompt (chat template where the model has one), answered by the target
    with transformers' batched `generate` (greedy at temperature 0, else sampled). The answer stops before EOS.
    `progress(n)` is called after each batch with the number of prompts done."""
    if max_new_tokens < 1 or batch_size < 1 or temperature < 0:
        raise ValueError("max_new_tokens and batch_size must be >= 1 and temperature >= 0")
    hf, tok = model.hf_model, model.tokenizer
    eos = set(model.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    sampled = temperature > 0
    # a fresh config: the model's own generation defaults (repetition penalty, ...) would make "greedy" differ
    # from the target's plain greedy; every EOS id of the model stops an answer (chat terminators included)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampled, pad_token_id=pad,
                              eos_token_id=sorted(eos),
                              **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sampled else {}))
    torch.manual_seed(seed)
    encoded = [model.encode(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[tuple[list[int], list[int]]] = [([], [])] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, W], left padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        generated = hf.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                generation_config=config)
        for row, i in enumerate(batch):
            answer = []
            for t in generated[row, width:].tolist():
                if t in eos:
                    break
                answer.append(t)
            out[i] = (encoded[i], answer)
        if progress is not None:
            progress(len(batch))
    return out


@dataclass(frozen=True)
class Predictions:
    """The target's top-k next tokens at answer positions: tokens [P] (the token at the position), top [P, k]
    (successor ids, most likely first), probs [P, k] (their probabilities)."""

    tokens: np.ndarray
    top: np.ndarray
    probs: np.ndarray


def greedy_pairs(path: str | Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the greedy answers in a corpus.jsonl that `leapdecode distill-tables` (or
    scripts/chain_counts.py, scripts/chain_ceiling.py) wrote; ValueError naming the file when it is not one."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return [(list(r["prompt_ids"]), list(r["answer_ids"])) for r in rows if not r.get("sampled", False)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a corpus.jsonl with prompt_ids and answer_ids per line ({exc})") from None


@torch.inference_mode()
def target_predictions(model, pairs: Sequence[tuple[list[int], list[int]]], top_k: int = 8,
                       tokens_per_batch: int = 8192, progress=None) -> Predictions:
    """Run the target over prompt + answer and keep its top-k at the last prompt position and at every answer
    position but the last (the positions whose next token is part of the answer). Sequences of similar length
    are batched together, at most `tokens_per_batch` padded tokens per forward (the logits of a batch take
    tokens x vocab x 4 bytes: 1.6 GB at 8192 tokens and a 49k vocabulary)."""
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, got {tokens_per_batch}")
    hf = model.hf_model
    live = sorted(((p, a) for p, a in pairs if a), key=lambda pa: len(pa[0]) + len(pa[1]))
    batches, start = [], 0
    while start < len(live):  # sorted by length: a batch's width is its last sequence's length
        end = start + 1
        while end < len(live) and (end + 1 - start) * (len(live[end][0]) + len(live[end][1])) <= tokens_per_batch:
            end += 1
        batches.append(live[start:end])
        start = end
    tokens, tops, probs = [], [], []
    for batch in batches:
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # [B, W], right padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, a) in enumerate(batch):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            mask[row, : len(p) + len(a)] = 1
        logits = hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # [B, W, V]
        for row, (p, a) in enumerate(batch):
            rows = slice(len(p) - 1, len(p) + len(a) - 1)
            prob, top = torch.softmax(logits[row, rows].float(), dim=-1).topk(top_k, dim=-1)  # [len(a), k]
            tokens.append(ids[row, rows].numpy())
            tops.append(top.to("cpu", torch.int32).numpy())
            probs.append(prob.to("cpu", torch.float32).numpy())
        del logits
        if progress is not None:
            progress(len(batch))
    if not tokens:
        return Predictions(np.zeros(0, np.int64), np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32))
    return Predictions(np.concatenate(tokens).astype(np.int64), np.concatenate(tops), np.concatenate(probs))
