"""Copy drafting in the style of CopySpec: a hash index of gamma-grams, and a copy length that adapts.

Like prompt lookup, this drafter guesses that the context repeats itself: it finds the most recent earlier
occurrence of the last `gamma` tokens and proposes what followed it. The difference is how it finds it and how
much it copies:

- An incremental hash index maps every gamma-gram of the context to the position where it most recently ended.
  Each call indexes only the tokens appended since the previous call, so the cost per step does not grow with
  the context. The index deliberately stops one position short of the root: the gram ending at the root is the
  suffix being looked up, and it must match an *earlier* occurrence, not itself. It is added on the next call,
  once it is no longer the suffix.
- Long verbatim copies (code, quoted passages) can be accepted for dozens of tokens, so the copy length adapts:
  it starts at `min_draft`, doubles after a copy that was accepted in full and halves after one rejected in its
  first half, within [min_draft, max_draft]. Set min_draft == max_draft for a fixed length.

Past the end of the context the copy reads on into its own output (an overlapping copy, period = distance from
the match to the root), the same rule as `leapdecode.drafters.pld.continuation`.

Drafts are deterministic chains (q = None), so every draft is lossless; the index and the adaptive length only
affect speed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from leapdecode.draft_length import ChainLength, chain_options
from leapdecode.drafters.base import Draft, StepResult
from leapdecode.sampling import SamplingConfig


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def build_index(tokens: Sequence[int], gamma: int) -> dict[tuple[int, ...], int]:
    """From scratch: every gamma-gram of `tokens` -> the position where its most recent occurrence ends.

    The reference the incremental index must equal (the drafter indexes tokens[:-1], i.e. up to before the root).
    """
    index: dict[tuple[int, ...], int] = {}
    for end in range(gamma - 1, len(tokens)):
        index[tuple(tokens[end - gamma + 1 : end + 1])] = end
    return index


class CopyDrafter:
    """CopySpec-style copy drafter (name "copy"): hash-indexed gamma-gram lookup with an adaptive copy length."""

    name = "copy"
    description = "copy: continue the most recent earlier occurrence of the last gamma tokens, adaptive length"

    def __init__(self, gamma: int = 3, min_draft: int = 8, max_draft: int = 64, adaptive: bool = False,
                 latency_curve: Any = None) -> None:
        """adaptive: also cap the copy length by draft_length.ChainLength (expected tokens per second from the
        target's latency curve). Off by default: a copy is either right for a long run or wrong at once, which
        the policy's single acceptance rate (a geometric model) describes badly."""
        _check_int("gamma", gamma, 1, 64)
        _check_int("max_draft", max_draft, 1, 1024)
        _check_int("min_draft", min_draft, 1, max_draft)
        self.gamma = gamma
        self.min_draft = min_draft
        self.max_draft = max_draft
        self.length = ChainLength(latency_curve) if adaptive and latency_curve is not None else None
        self.draft_len = min_draft  # current copy length, adapted by observe()
        self.index: dict[tuple[int, ...], int] = {}  # gamma-gram -> end of its most recent occurrence before the root
        self._tokens: list[int] = []  # the context seen so far
        self._next_end = gamma - 1  # first gram end not yet indexed

    @classmethod
    def from_options(cls, kwargs: dict[str, Any], target: Any = None, **context: Any):
        """Registry entry: with a target and adaptive=True, the chain length adapts to the target's latency."""
        return cls(**chain_options(kwargs, target, adaptive_default=False))

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> None:
        """Forget the previous request (index and copy length) and index `prompt`."""
        self._clear()
        self.draft_len = self.min_draft
        if self.length:
            self.length.reset()
        self._sync(prompt)

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self._sync(context)
        tokens, size = self._tokens, len(self._tokens)
        length = min(self.draft_len, budget)
        length = self.length.limit(length) if self.length else length  # what pays on this hardware, now
        if length == 0 or size < self.gamma:
            return Draft.empty()
        end = self.index.get(tuple(tokens[size - self.gamma :]))
        if end is None:
            return Draft.empty()
        segment = tokens[end + 1 :]  # what followed the match, up to and including the root; end < size - 1
        repeats = -(-length // len(segment))  # ceil: read on into our own output (overlapping copy)
        return Draft.chain((segment * repeats)[:length])

    def observe(self, step: StepResult) -> None:
        """Adapt the copy length: double after a fully accepted copy, halve after a rejection in its first half."""
        drafted, accepted = step.draft.n, len(step.path)
        if self.length:
            self.length.observe(drafted, accepted)
        if drafted == 0:
            return
        if accepted == drafted:
            self.draft_len = min(2 * self.draft_len, self.max_draft)
        elif 2 * accepted < drafted:
            self.draft_len = max(self.draft_len // 2, self.min_draft)

    def state_bytes(self) -> int:
        """Approximate memory held by this drafter: the index (table, key tuples, position ints) and the token list
        (list plus one int object per token; the key tuples share those ints). O(size of the index): diagnostics."""
        total = sys.getsizeof(self.index) + sys.getsizeof(self._tokens) + 28 * len(self._tokens)
        for key, end in self.index.items():
            total += sys.getsizeof(key) + sys.getsizeof(end)
        return total + 200  # the object and its few scalars

    def _clear(self) -> None:
        self.index = {}
        self._tokens = []
        self._next_end = self.gamma - 1

    def _sync(self, context: Sequence[int]) -> None:
        """Take in the tokens of `context` appended since the last call and index the grams ending before the root.

        O(new tokens). If `context` is not an extension of what was seen (a new request without `reset`) the index
        is rebuilt; the check is cheap (length, first and last seen token), and a missed mismatch could only cost
        speed, never correctness, because every draft is verified.
        """
        tokens, seen = self._tokens, len(self._tokens)
        if seen and (len(context) < seen or int(context[seen - 1]) != tokens[-1] or int(context[0]) != tokens[0]):
            self._clear()
            tokens, seen = self._tokens, 0
        new = context[seen:]
        tokens.extend(new.tolist() if hasattr(new, "tolist") else [int(t) for t in new])
        gamma, index = self.gamma, self.index
        for end in range(self._next_end, len(tokens) - 1):  # stop before the root: it is the suffix looked up
            index[tuple(tokens[end - gamma + 1 : end + 1])] = end
        self._next_end = max(self._next_end, len(tokens) - 1)
