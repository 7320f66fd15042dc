"""Question suites: Spec-Bench's question.jsonl, and a small built-in suite that runs anywhere.

A question is one conversation: one or more user turns. Multi-turn questions are answered turn by turn, each turn
seeing the model's own earlier answers (that is how Spec-Bench runs its two-turn MT-Bench categories).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

SPEC_BENCH_DEFAULT = Path("../shared/data/spec_bench/question.jsonl")  # relative to the repository root
SPEC_BENCH_SOURCE = ("https://github.com/hemingkx/Spec-Bench (file data/spec_bench/question.jsonl, 480 questions "
                     "in 13 categories)")
SUITES = ("spec-bench", "builtin")


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]  # user messages, answered one after the other

    def __post_init__(self) -> None:
        if not self.turns or any(not isinstance(t, str) or not t for t in self.turns):
            raise ValueError(f"question {self.question_id!r} needs at least one non-empty text turn")


# ---------------------------------------------------------------------------------------------------- Spec-Bench


def find_spec_bench(path: str | os.PathLike | None = None) -> Path:
    """The Spec-Bench question file: `path` when given, else the default location beside the repository.

    The default is looked up relative to the working directory and then relative to this checkout's root, so the
    command works from the repository root and from an installed editable checkout alike.
    """
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise FileNotFoundError(f"Spec-Bench question file {str(given)!r} does not exist. Get question.jsonl "
                                    f"from {SPEC_BENCH_SOURCE}, or run the built-in suite with --suite builtin.")
        return given
    repo_root = Path(__file__).resolve().parents[3]  # src/leapdecode/bench/suites.py -> repository root
    for candidate in (SPEC_BENCH_DEFAULT, repo_root / SPEC_BENCH_DEFAULT):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no Spec-Bench question file: the default {str(SPEC_BENCH_DEFAULT)!r} (relative to the "
                            f"repository root) does not exist and no --questions PATH was given. Get question.jsonl "
                            f"from {SPEC_BENCH_SOURCE} and pass --questions PATH, or run the built-in suite with "
                            "--suite builtin.")


def load_spec_bench(path: str | os.PathLike) -> list[Question]:
    """Every question of a Spec-Bench-format JSON-lines file (keys question_id, category, turns), in file order."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                questions.append(Question(row["question_id"], str(row["category"]), tuple(row["turns"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line_no}: not a Spec-Bench question ({err}); expected a JSON object with "
                                 "question_id, category and turns (a list of strings)") from None
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ selection


def categories_of(questions: list[Question]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(q.category for q in questions))


def select(questions: list[Question], categories: list[str] | None = None, limit: int | None = None,
           turns: str = "all") -> list[Question]:
    """Keep `categories` (all when None; in the order given), the first `limit` questions of each, and either every
    turn (turns="all") or only the first (turns="first")."""
    if turns not in ("all", "first"):
        raise ValueError(f"turns must be 'all' or 'first', got {turns!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit (questions per category) must be >= 1, got {limit}")
    available = categories_of(questions)
    wanted = available if not categories else list(dict.fromkeys(categories))
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"this suite has: {', '.join(available)}")
    out = []
    for category in wanted:
        chosen = [q for q in questions if q.category == category][:limit]
        out += [Question(q.question_id, q.category, q.turns[:1]) if turns == "first" else q for q in chosen]
    return out


# ------------------------------------------------------------------------------------------------ built-in suite

_CONTEXT_LIGHTHOUSE = (
    "The lighthouse on Carrow Point was built in 1871 from granite quarried two miles inland and hauled to the cliff "
    "on sledges. For ninety years three keepers lived in the cottages at its foot, taking turns to trim the wick and "
    "wind the clockwork that turned the lens. In 1962 the light was converted to electricity and the keepers left. "
    "The cottages stood empty until 2004, when a local trust restored them as a small museum. Today the museum shows "
    "the original lens, the keepers' logbooks and a model of the sledges, and volunteers open the tower to visitors "
    "on summer weekends.")

_CONTEXT_ORCHARD = (
    "Maple Street Community Orchard has 42 fruit trees: 18 apple, 11 pear, 9 plum and 4 cherry. Volunteers meet "
    "every second Saturday from 9 a.m. to noon. The orchard's rules: fruit may be picked by anyone for their own use, "
    "but not sold; dogs must be kept on a lead; and ladders may only be used when a second person holds them. "
    "Pruning takes place in February, and the harvest festival is held on the last Sunday of September. The orchard "
    "is funded by a yearly grant of 1,500 pounds from the town council and by donations.")

_CONTEXT_BATTERY = (
    "A battery's capacity is the charge it can deliver, usually given in milliampere-hours (mAh). A phone battery "
    "rated 4,000 mAh can in principle supply 400 mA for ten hours. In practice the usable capacity falls as the "
    "battery ages: after about 500 full charge cycles a typical lithium-ion cell keeps roughly 80 percent of its "
    "original capacity. Heat speeds this ageing, which is why leaving a phone charging in a hot car is harmful. "
    "Keeping the charge between 20 and 80 percent also slows the loss, because the cell is under the least "
    "chemical stress in that range.")

# Written for this project: two or three prompts per task, short enough to run anywhere in seconds.
BUILTIN = (
    Question("chat-1", "chat", ("What are three good habits for getting better sleep? Answer briefly.",
                                "Which of those habits is the easiest to start with, and why?")),
    Question("chat-2", "chat", ("I have a job interview tomorrow for a library assistant position. "
                                "Give me a few tips to prepare tonight.",)),
    Question("chat-3", "chat", ("Suggest a name for a small bakery that sells bread and cinnamon rolls, "
                                "and explain your choice in one sentence.",)),
    Question("code-1", "code", ("Write a Python function `is_palindrome(s)` that returns True when the string reads "
                                "the same forwards and backwards, ignoring case and spaces.",)),
    Question("code-2", "code", ("Here is a Python function:\n\ndef total(prices):\n    result = 0\n    for p in prices:"
                                "\n        result = result + p\n    return result\n\nRewrite it so that it also "
                                "accepts a discount argument (a fraction between 0 and 1) that is applied to the "
                                "total. Keep the same style.",)),
    Question("code-3", "code", ("Write a SQL query that lists the names of customers who placed more than three "
                                "orders, given tables customers(id, name) and orders(id, customer_id, date).",)),
    Question("summarization-1", "summarization", (f"Summarize the following text in two sentences.\n\n"
                                                  f"{_CONTEXT_LIGHTHOUSE}",)),
    Question("summarization-2", "summarization", (f"Summarize the rules and schedule of this orchard as a short "
                                                  f"bulleted list.\n\n{_CONTEXT_ORCHARD}",)),
    Question("translation-1", "translation", ("Translate to French: The museum opens at ten o'clock, and the "
                                              "tickets are sold at the door.",)),
    Question("translation-2", "translation", ("Translate to German: My brother is learning to play the piano, and "
                                              "he practises every evening after dinner.",)),
    Question("translation-3", "translation", ("Translate to Spanish: Please close the window when you leave the "
                                              "room.",)),
    Question("math-1", "math", ("A train travels 180 kilometres in 2 hours and then 120 kilometres in 1.5 hours. "
                                "What is its average speed for the whole journey? Show your steps.",)),
    Question("math-2", "math", ("Tom has 3 boxes with 12 pencils each. He gives away 15 pencils. How many pencils "
                                "does he have left? Explain step by step.",)),
    Question("rag-1", "rag", (f"Answer the question using only the passage.\n\nPassage: {_CONTEXT_ORCHARD}\n\n"
                              "Question: How many plum trees does the orchard have, and when is the harvest "
                              "festival?",)),
    Question("rag-2", "rag", (f"Answer the question using only the passage.\n\nPassage: {_CONTEXT_BATTERY}\n\n"
                              "Question: Why should a phone not be left charging in a hot car?",)),
    Question("rag-3", "rag", (f"Answer the question using only the passage.\n\nPassage: {_CONTEXT_LIGHTHOUSE}\n\n"
                              "Question: What happened to the keepers' cottages after 1962?",)),
)


def load_suite(suite: str, questions_path: str | os.PathLike | None = None) -> tuple[list[Question], dict]:
    """The questions of a suite and facts about their source (for meta.json)."""
    if suite == "builtin":
        return list(BUILTIN), {"suite": "builtin", "questions_file": None, "questions_sha256": None}
    if suite == "spec-bench":
        path = find_spec_bench(questions_path)
        return load_spec_bench(path), {"suite": "spec-bench", "questions_file": str(path),
                                       "questions_sha256": file_digest(path)}
    raise ValueError(f"unknown suite {suite!r}; available: {', '.join(SUITES)}")
