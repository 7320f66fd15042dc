"""Run every method on every question, interleaved, and record one row per generation.

For each question (and repeat) every method answers before the next question starts, in an order rotated from one
question to the next, so slow drift of the machine (thermal state, other load) falls on all methods alike. Each
method first runs one short warm-up generation that is not recorded. A multi-turn question is a conversation: each
turn's prompt holds the earlier turns and the method's own earlier answers.

Exactness: under greedy decoding every method's tokens are compared with the baseline's (`none`) for the same
question, turn and repeat; a row records whether they are identical and where they first differ. Under sampling,
identity of single samples means nothing (exactness is a property of the distribution), so it is left as None.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leapdecode.bench.methods import BASELINE, Method, Run
from leapdecode.bench.suites import Question
from leapdecode.models.base import Model
from leapdecode.sampling import SamplingConfig

WARMUP_PROMPT = "Say hello."
WARMUP_TOKENS = 32  # at most max_new_tokens; long enough to bring a GPU's clocks and kernel caches up

# Keys of one raw.jsonl row, in the order written (the schema the tests check).
RECORD_KEYS = (
    "method", "kind", "question_id", "category", "turn", "repeat", "seed",
    "prompt_tokens", "new_tokens", "seconds", "tokens_per_second",
    "steps", "mat", "draft_tokens", "accepted_tokens", "drafted_per_depth", "accepted_per_depth",
    "prefill_seconds", "drafter_seconds", "target_seconds", "stop_reason",
    "peak_memory_bytes", "drafter_state_bytes", "identical", "first_divergence", "tokens", "text", "extra",
)
_STATS_KEYS = ("steps", "mat", "draft_tokens", "accepted_tokens", "drafted_per_depth", "accepted_per_depth",
               "prefill_seconds", "drafter_seconds", "target_seconds", "stop_reason")


@dataclass(frozen=True)
class BenchConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (exactness checked token by token)
    seed: int = 0  # base sampling seed; each (question, repeat, turn) gets its own: seed + its index in the run
    repeats: int = 1
    budget: int = 64  # most draft nodes verified per step (leapdecode methods)
    chat: bool = True  # render prompts with the model's chat template
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.budget < 0:
            raise ValueError(f"budget (draft nodes per step) must be >= 0, got {self.budget}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


Progress = Callable[[int, int, str], None]  # (generations done, generations in all, what runs now)


def count_generations(questions: Sequence[Question], methods: Sequence[Method], config: BenchConfig) -> int:
    return sum(len(q.turns) for q in questions) * config.repeats * len(methods)


def run_bench(model: Model, questions: Sequence[Question], methods: Sequence[Method], config: BenchConfig, *,
              raw_path: str | os.PathLike | None = None, progress: Progress | None = None) -> list[dict]:
    """Run `methods` on `questions`; return the rows (and append them to `raw_path` as JSON lines, one block per
    question, so an interrupted run keeps what it finished)."""
    names = [m.name for m in methods]
    if BASELINE not in names:
        raise ValueError(f"the methods must include {BASELINE!r}: it is the reference for exactness and speed-up")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    if model.tokenizer is None:
        raise ValueError(f"model {model.name!r} has no tokenizer; the benchmark prompts are text")
    if config.warmup:
        warmup_ids = encode(model, [WARMUP_PROMPT], [], config.chat)
        for method in methods:
            method.generate(warmup_ids, min(WARMUP_TOKENS, config.max_new_tokens),
                            SamplingConfig(config.temperature, seed=config.seed))
    total, done = count_generations(questions, methods, config), 0
    max_turns = max((len(q.turns) for q in questions), default=1)
    rows: list[dict] = []
    raw = open(raw_path, "a", encoding="utf-8") if raw_path is not None else None
    try:
        for qi, question in enumerate(questions):
            for repeat in range(config.repeats):
                shift = (qi * config.repeats + repeat) % len(methods)
                block: list[dict] = []
                for method in list(methods[shift:]) + list(methods[:shift]):  # rotated order
                    answers: list[str] = []
                    for turn in range(len(question.turns)):
                        if progress is not None:
                            progress(done, total, f"{question.category} {question.question_id} · {method.name}")
                        seed = config.seed + (qi * config.repeats + repeat) * max_turns + turn  # unique per turn
                        prompt = encode(model, question.turns[: turn + 1], answers, config.chat)
                        run = method.generate(prompt, config.max_new_tokens, SamplingConfig(config.temperature,
                                                                                            seed=seed))
                        text = model.decode(run.tokens)
                        answers.append(text)
                        block.append(make_row(method, question, turn, repeat, seed, len(prompt), run, text))
                        done += 1
                mark_exactness(block, config.greedy)
                block.sort(key=lambda r: (names.index(r["method"]), r["turn"]))
                rows += block
                if raw is not None:
                    raw.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in block)
                    raw.flush()
        if progress is not None:
            progress(done, total, "done")
    finally:
        if raw is not None:
            raw.close()
    return rows


def encode(model: Model, turns: Sequence[str], answers: Sequence[str], chat: bool) -> list[int]:
    """Prompt ids for the last of `turns`, after the earlier turns and their answers."""
    if chat:
        messages: list[dict[str, str]] = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers) and i < len(turns) - 1:
                messages.append({"role": "assistant", "content": answers[i]})
        return model.encode(messages, chat=True)
    parts = [p for i, turn in enumerate(turns) for p in ([turn] + ([answers[i]] if i < len(turns) - 1 else []))]
    return model.encode("\n\n".join(parts), chat=False)


def make_row(method: Method, question: Question, turn: int, repeat: int, seed: int, prompt_tokens: int, run: Run,
             text: str) -> dict[str, Any]:
    stats = run.stats or {}
    row = {
        "method": method.name, "kind": method.kind, "question_id": question.question_id,
        "category": question.category, "turn": turn, "repeat": repeat, "seed": seed,
        "prompt_tokens": prompt_tokens, "new_tokens": len(run.tokens), "seconds": run.seconds,
        "tokens_per_second": len(run.tokens) / run.seconds if run.seconds > 0 else 0.0,
        **{k: stats.get(k) for k in _STATS_KEYS},
        "peak_memory_bytes": run.peak_memory_bytes, "drafter_state_bytes": run.drafter_state_bytes,
        "identical": None, "first_divergence": None, "tokens": list(run.tokens), "text": text,
        "extra": stats.get("extra", {}),
    }
    assert tuple(row) == RECORD_KEYS
    return row


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where a and b differ (a length difference counts), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def mark_exactness(block: list[dict], greedy: bool) -> None:
    """Compare each row's tokens with the baseline's row for the same turn (greedy only)."""
    if not greedy:
        return
    reference = {r["turn"]: r["tokens"] for r in block if r["method"] == BASELINE}
    for row in block:
        where = first_divergence(row["tokens"], reference[row["turn"]])
        row["identical"], row["first_divergence"] = where is None, where


def write_meta(path: str | os.PathLike, meta: dict) -> None:
    Path(path).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def config_dict(config: BenchConfig) -> dict:
    return asdict(config)


def machine() -> dict:
    """What the numbers were measured on."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform()}


def versions() -> dict:
    import platform

    import torch
    import transformers

    import leapdecode

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "leapdecode": leapdecode.__version__}


def make_meta(*, model: Model, methods: Sequence[Method], config: BenchConfig, suite: dict, selection: dict,
              questions: int, generations: int, command: str | None = None, assistant: str | None = None,
              runner: str | None = None) -> dict:
    from datetime import datetime, timezone

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": model.name,
        "assistant": assistant,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "runner": runner,
        "machine": machine(),
        "versions": versions(),
        "suite": suite,
        "selection": selection,
        "config": config_dict(config),
        "methods": [{"name": m.name, "kind": m.kind, "options": {k: str(v) for k, v in m.options.items()}}
                    for m in methods],
        "baseline": BASELINE,
        "questions": questions,
        "generations": generations,
    }
