"""The decode loop: guess, verify, accept, commit, observe, emit.

`speculate` is the whole algorithm on token ids. `generate` and `stream` wrap it with tokenization, stop strings
and text streaming for a loaded Model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from leapdecode.accept import accept
from leapdecode.drafters.base import Drafter, StepResult
from leapdecode.drafters.none import NoDrafter
from leapdecode.models.base import Model, TargetRunner
from leapdecode.sampling import SamplingConfig, make_generator
from leapdecode.stats import Stats
from leapdecode.tree import depths


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence
    budget: int = 64  # most draft nodes verified per step
    ignore_eos: bool = False  # keep going past EOS (benchmarks that want fixed lengths)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.budget < 0:
            raise ValueError(f"budget (draft nodes per step) must be >= 0, got {self.budget}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


def speculate(runner: TargetRunner, prompt: Sequence[int], drafter: Drafter | None, config: GenerationConfig,
              eos_token_ids: Sequence[int] = (), stats: Stats | None = None) -> Iterator[list[int]]:
    """Yield the new tokens of each step (accepted draft tokens, then the bonus), until EOS or max_new_tokens.

    Invariant: the runner's cache holds context[:-1]; context[-1] is the root, whose logits come from the next verify.
    """
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    drafter = drafter or NoDrafter()
    stats = stats if stats is not None else Stats()
    stats.drafter, stats.prompt_tokens = drafter.name, len(prompt)
    eos = set() if config.ignore_eos else set(eos_token_ids)
    generator = make_generator(config.sampling.seed, runner.device)
    start = time.perf_counter()
    runner.reset()
    drafter.reset(list(prompt), config.sampling)
    runner.prefill(prompt[:-1])
    stats.prefill_seconds = time.perf_counter() - start
    context, root = list(prompt), prompt[-1]
    while stats.new_tokens < config.max_new_tokens:
        remaining = config.max_new_tokens - stats.new_tokens
        t0 = time.perf_counter()
        draft = drafter.propose(context, min(config.budget, remaining - 1))       # 1. guess
        if draft.n > min(config.budget, remaining - 1) or (draft.n and not draft.is_chain
                                                           and not runner.supports_trees):
            raise RuntimeError(f"drafter {drafter.name!r} proposed {draft.n} nodes over a budget of "
                               f"{min(config.budget, remaining - 1)} (or a tree to a chain-only runner)")
        t1 = time.perf_counter()
        logits = runner.verify(root, draft)                                       # 2. one pass over root + nodes
        acceptance = accept(draft, logits[: draft.n + 1], config.sampling, generator)  # 3. exact rule
        runner.commit(acceptance.path)                                            # 4. keep root + accepted KV
        t2 = time.perf_counter()
        emitted = draft.tokens[acceptance.path].tolist() + [acceptance.bonus]
        drafter.observe(StepResult(root, draft, logits, acceptance.path, acceptance.bonus, emitted))  # 5. learn
        t3 = time.perf_counter()
        stats.drafter_seconds += (t1 - t0) + (t3 - t2)
        stats.target_seconds += t2 - t1
        stats.record_step(max(depths(draft.parents), default=0), draft.n, len(acceptance.path))
        context += emitted                                                        # 6. emit; the bonus is the new root
        root = acceptance.bonus
        hit = next((i for i, t in enumerate(emitted) if t in eos), None)
        emitted = emitted[:hit] if hit is not None else emitted[:remaining]
        stats.new_tokens += len(emitted)
        stats.total_seconds = time.perf_counter() - start
        if emitted:
            yield emitted
        if hit is not None:
            stats.stop_reason = "eos"
            break
    else:
        stats.stop_reason = "length"
    stats.extra.update(getattr(drafter, "report", dict)())  # drafter facts (e.g. a chosen tree budget)


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: Stats


class TextStream:
    """Iterator of text pieces for one request; after iteration `.text`, `.tokens` and `.stats` hold the result.

    Stop strings end generation before their first occurrence; text that could still become a stop string is held
    back until it is decided, so a streamed piece never has to be taken back.
    """

    def __init__(self, model: Model, prompt_ids: list[int], drafter: Drafter | None, config: GenerationConfig,
                 runner: TargetRunner | None = None) -> None:
        self.model, self.config = model, config
        self.runner = runner or model.runner()
        self.stats = Stats()
        self.tokens: list[int] = []
        self.text = ""
        self._steps = speculate(self.runner, prompt_ids, drafter, config, model.eos_token_ids, self.stats)

    def __iter__(self) -> Iterator[str]:
        sent = 0
        hold = max((len(s) for s in self.config.stop), default=1) - 1
        for emitted in self._steps:
            self.tokens += emitted
            text = self.model.decode(self.tokens)
            cut = min((i for i in (text.find(s) for s in self.config.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:cut]
                self.stats.stop_reason = "stop"
                self._steps.close()
                break
            self.text = text
            safe = len(text) - hold
            while safe > sent and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character: wait
                safe -= 1
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if len(self.text) > sent:
            yield self.text[sent:]


def stream(model: Model, prompt: str | list[dict[str, str]] | list[int], drafter: Drafter | None = None,
           config: GenerationConfig | None = None, *, chat: bool | None = None,
           runner: TargetRunner | None = None) -> TextStream:
    """Stream text pieces. `prompt` is text (chat-templated when the model has a template, unless chat=False),
    chat messages, or token ids."""
    ids = prompt if _is_token_ids(prompt) else model.encode(prompt, chat=chat)
    return TextStream(model, list(ids), drafter, config or GenerationConfig(), runner)


def generate(model: Model, prompt: str | list[dict[str, str]] | list[int], drafter: Drafter | None = None,
             config: GenerationConfig | None = None, *, chat: bool | None = None,
             runner: TargetRunner | None = None) -> Generation:
    """Generate a completion; identical to plain decoding (greedy) or distributed as it (sampling)."""
    text_stream = stream(model, prompt, drafter, config, chat=chat, runner=runner)
    for _ in text_stream:
        pass
    return Generation(text_stream.text, text_stream.tokens, text_stream.stats)


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple, torch.Tensor)) and len(prompt) > 0 and not isinstance(prompt[0], dict) \
        and not isinstance(prompt[0], str)
