"""Prompt lookup decoding: draft what followed the most recent earlier occurrence of the context's suffix.

Text repeats itself: answers quote the question, code edits repeat the code, summaries reuse phrases. When the last
n tokens of the context occurred before, the tokens that followed that earlier occurrence are a free guess for what
comes next. No model runs and the draft is deterministic (q = None), so any guess is lossless; only speed depends on
how good it is.

Why it is fast: the context lives in a growing int64 numpy buffer that receives only the tokens appended since the
last call. One propose compares the root against the whole buffer once (vectorised) to get every candidate match of
length 1, then lengthens the match one token at a time by filtering the (few) surviving candidates. The longest
length still alive wins, and within it the most recent candidate. On a 4k-token context this is tens of
microseconds, against milliseconds for a Python rescan per n.

Overlapping copies: when the match is so recent that its continuation runs into the end of the context (match end
j, root at L - 1, so only p = L - 1 - j tokens follow it), the copy reads on into the tokens it is itself drafting,
like an overlapping copy in LZ77: the draft repeats the last p tokens with period p. That is exactly what a model
stuck in a loop will write next, and it is still "what followed the earlier occurrence", read one period later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from leapdecode.draft_length import ChainLength, chain_options
from leapdecode.drafters.base import Draft, StepResult
from leapdecode.sampling import SamplingConfig


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def find_match(buf: np.ndarray, max_ngram: int, min_ngram: int) -> tuple[int, int]:
    """Longest suffix match in `buf` [L]: returns (n, j) for the largest n in [min_ngram, max_ngram] such that
    buf[j - n + 1 : j + 1] == buf[L - n : L] for some j < L - 1 (never the suffix itself), with j the most recent
    such end; (0, -1) when no n in range matches.
    """
    size = buf.shape[0]
    if size < 2:
        return 0, -1
    ends = np.flatnonzero(buf[: size - 1] == buf[size - 1])  # [m] ends j < L - 1 of matches of length 1
    best = (0, -1)
    for k in range(max_ngram):  # a match of length k + 1 ending at j also needs buf[j - k] == buf[L - 1 - k]
        if k:
            ends = ends[ends >= k]  # the earlier occurrence must start inside the buffer (j - k >= 0)
            if ends.size == 0:
                break
            ends = ends[buf[ends - k] == buf[size - 1 - k]]  # size - 1 - k > 0 since k <= j < size - 1
        if ends.size == 0:
            break
        if k + 1 >= min_ngram:
            best = (k + 1, int(ends[-1]))  # np.flatnonzero is ascending: the last end is the most recent
    return best


def continuation(buf: np.ndarray, end: int, length: int) -> np.ndarray:
    """The `length` tokens that follow position `end` of `buf` [L], read as an overlapping copy: past the end of
    the buffer the copy continues with its own output, i.e. repeats buf[end + 1 : L] with period L - 1 - end.
    """
    segment = buf[end + 1 :]  # [p], p >= 1 because end < L - 1
    if length <= segment.shape[0]:
        return segment[:length]
    return np.resize(segment, length)  # np.resize repeats its input cyclically


class PromptLookup:
    """Prompt lookup decoding (name "pld"): deterministic chains copied from earlier in the context."""

    skips_steps = True  # steps may go by without propose and observe (Drafter.skips_steps)

    name = "pld"
    description = "prompt lookup: copy what followed the most recent earlier occurrence of the last n tokens"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_draft_tokens: int = 10,
                 adaptive: bool = True, latency_curve: Any = None) -> None:
        _check_int("max_ngram", max_ngram, 1, 64)
        _check_int("min_ngram", min_ngram, 1, max_ngram)
        _check_int("num_draft_tokens", num_draft_tokens, 1, 1024)
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.num_draft_tokens = num_draft_tokens
        self.length = ChainLength(latency_curve) if adaptive and latency_curve is not None else None
        self._buf = np.zeros(256, dtype=np.int64)  # [capacity] the context seen so far, doubled when full
        self._len = 0  # tokens of _buf in use

    @classmethod
    def from_options(cls, kwargs: dict[str, Any], target: Any = None, **context: Any):
        """Registry entry: with a target, the chain length adapts to the target's measured step latency."""
        return cls(**chain_options(kwargs, target))

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> None:
        """Forget the previous request and index `prompt` (sampling is irrelevant to a deterministic drafter)."""
        self._len = 0
        if self.length:
            self.length.reset()
        self._sync(prompt)

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self._sync(context)
        length = min(self.num_draft_tokens, budget)
        length = self.length.limit(length) if self.length else length  # what pays on this hardware, now
        if length == 0:
            return Draft.empty()
        buf = self._buf[: self._len]  # [L] view, root = buf[L - 1]
        n, end = find_match(buf, self.max_ngram, self.min_ngram)
        if n == 0:
            return Draft.empty()
        # copy: a slice of the buffer is a view, and the buffer is overwritten after the next reset
        return Draft.chain(torch.from_numpy(continuation(buf, end, length).copy()))  # [length]

    def observe(self, step: StepResult) -> None:
        """The accepted tokens reach the buffer through the next `context`; only the chain length learns."""
        if self.length:
            self.length.observe(step.draft.n, len(step.path))

    def state_bytes(self) -> int:
        """Memory held by this drafter's state: the token buffer (its whole capacity) plus the object itself."""
        return int(self._buf.nbytes) + 200

    def _sync(self, context: Sequence[int]) -> None:
        """Append the tokens of `context` this drafter has not seen.

        The context of a request only grows, so normally only the new tail is copied (O(new tokens)). If `context`
        is not an extension of what was seen (a new request without `reset`), the buffer is rebuilt; the check is
        cheap (length, first and last seen token), and a missed mismatch could only cost speed, never correctness,
        because every draft is verified.
        """
        size, seen = len(context), self._len
        if seen and (size < seen or int(context[seen - 1]) != self._buf[seen - 1] or int(context[0]) != self._buf[0]):
            seen = 0
        new = np.asarray(context[seen:], dtype=np.int64).reshape(-1)  # [size - seen]
        if size > self._buf.shape[0]:
            grown = np.zeros(max(size, 2 * self._buf.shape[0]), dtype=np.int64)
            grown[:seen] = self._buf[:seen]
            self._buf = grown
        self._buf[seen:size] = new
        self._len = size
