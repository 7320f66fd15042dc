"""One request inside the scheduler: its decoding state, its text with stop strings, and the events it reports.

A Sequence owns everything that makes its output its own: the prompt, the GenerationConfig, a drafter instance, a
seeded torch.Generator, a Stats record and an acceptance estimate. The scheduler only decides when it runs and how
much it may draft. Results leave through `sink`, a callable the API layer supplies (it forwards events to the
request's asyncio queue), so the scheduler never touches the event loop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import torch

from leapdecode.decode import GenerationConfig
from leapdecode.drafters.base import Drafter
from leapdecode.sampling import make_generator
from leapdecode.draft_length import AcceptanceEstimate
from leapdecode.stats import Stats


@dataclass(frozen=True)
class Delta:
    """New text for the client (already safe from stop strings)."""

    text: str


@dataclass(frozen=True)
class Finished:
    text: str  # the whole completion
    finish_reason: str  # "stop" (EOS or stop string), "length" or "cancelled"
    tokens: list[int]  # generated token ids (EOS excluded; a stop string's step included)
    stats: Stats
    ttft: float  # seconds from arrival to the first token (0 when none was produced)
    latency: float  # seconds from arrival to the end


@dataclass(frozen=True)
class Failed:
    status: int  # HTTP status to answer with
    message: str


class TextAssembler:
    """Detokenises a growing token list and applies stop strings, like `leapdecode.decode.TextStream`.

    The text is always `decode(tokens)` cut before the first stop string, so it equals offline `generate`'s text.
    Text that could still become a stop string (the last len(longest stop) - 1 characters), or that ends in an
    incomplete multi-byte character, is held back until it is decided: a sent piece is never taken back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Seq[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def add(self, tokens: Seq[int]) -> str:
        """Take new tokens; return the text that became safe to send (maybe empty)."""
        self.tokens += tokens
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        self.text = text
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character: wait
            safe -= 1
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece

    def flush(self) -> str:
        """At the end: whatever was held back."""
        piece = self.text[self.sent :]
        self.sent = max(self.sent, len(self.text))
        return piece


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request's decoding state. States: waiting -> prefill -> decode -> done."""

    prompt: list[int]
    config: GenerationConfig
    drafter: Drafter
    sink: Callable[[Delta | Finished | Failed], None]
    text: TextAssembler
    eos_token_ids: tuple[int, ...] = ()
    reproducible: bool = False  # seeded sampling: draft lengths must not depend on the batch
    device: str | torch.device = "cpu"  # where the target's logits live (the generator must be there too)
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    state: str = "waiting"
    stats: Stats = field(default_factory=Stats)
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    slot: object = None  # the batch runner's slot (Slot or FastSlot) while admitted
    prefilled: int = 0  # prompt tokens (of prompt[:-1]) already in the cache
    first_token: float = 0.0  # perf_counter of the first emitted token
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("the prompt must contain at least one token")
        self.context = list(self.prompt)  # prompt + generated; context[-1] is the root
        self.root = self.prompt[-1]
        self.generator = make_generator(self.config.sampling.seed, self.device)
        self.stats.drafter, self.stats.prompt_tokens = self.drafter.name, len(self.prompt)
        self.eos = set() if self.config.ignore_eos else set(self.eos_token_ids)

    @property
    def remaining(self) -> int:
        return self.config.max_new_tokens - self.stats.new_tokens

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        """Thread-safe: the scheduler drops the sequence before its next step."""
        self.cancel_event.set()

    def emit(self, emitted: list[int]) -> bool:
        """Record one step's emitted tokens (accepted + bonus); send new text. True when the sequence is finished."""
        self.context += emitted
        self.root = emitted[-1]
        hit = next((i for i, t in enumerate(emitted) if t in self.eos), None)
        kept = emitted[:hit] if hit is not None else emitted[: self.remaining]
        self.stats.new_tokens += len(kept)
        if kept and not self.first_token:
            self.first_token = time.perf_counter()
        piece = self.text.add(kept) if kept else ""
        if piece:
            self.sink(Delta(piece))
        if self.text.stopped:
            self.stats.stop_reason = "stop"
        elif hit is not None:
            self.stats.stop_reason = "eos"
        elif self.remaining <= 0:
            self.stats.stop_reason = "length"
        return bool(self.stats.stop_reason)

    def finish(self, reason: str | None = None) -> Finished:
        """Flush the text and report the result (reason overrides, e.g. "cancelled")."""
        self.state = "done"
        now = time.perf_counter()
        self.stats.total_seconds = now - self.arrival
        tail = self.text.flush()
        if tail and reason != "cancelled":
            self.sink(Delta(tail))
        stop_reason = reason or self.stats.stop_reason
        finish_reason = {"eos": "stop", "stop": "stop", "length": "length"}.get(stop_reason, stop_reason)
        self.stats.extra.update(getattr(self.drafter, "report", dict)())
        result = Finished(self.text.text, finish_reason, list(self.text.tokens), self.stats,
                          self.first_token - self.arrival if self.first_token else 0.0, now - self.arrival)
        self.sink(result)
        return result


def needs_reproducible_drafts(config: GenerationConfig) -> bool:
    """Seeded sampling promises the same output for the same request whatever else the server is doing; the random
    draws of speculative sampling depend on the drafts, so such a request's draft lengths must be its own."""
    return not config.sampling.greedy and config.sampling.seed is not None
