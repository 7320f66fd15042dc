"""Lookahead decoding (Fu et al. 2024) as a drafter: Jacobi iteration harvests n-grams, the root's n-grams are drafted.

No second model runs. The target itself, in the same forward pass that verifies the draft, also runs one Jacobi
iteration over a window of guessed future tokens (the *lookahead branch*, carried as the Draft's auxiliary branch).
Jacobi iteration improves a guess of several future tokens in parallel: each guessed token is replaced by the
target's greedy prediction given the guesses before it. The guesses rarely become right where they stand (the
context moves on every step), but the trajectories they follow contain n-grams the target really writes, and those
are collected into a pool. Each step drafts the pool's n-grams that start with the root token, as a tree.

The window is N - 1 levels x W columns of tokens (level 0 oldest). Column j is one Jacobi trajectory: the token at
(level l, column j) sits at offset l + j + 1 after the root, and its sequence, in position order, is level 0 at
columns 0 .. j (offsets 1 .. j + 1) and then column j at levels 1 .. l (offsets j + 2 .. l + j + 1). So (l, j)
attends to the committed prefix, the root, level 0 at columns <= j and its own column at levels <= l: every position
from the root to itself exactly once, a well-formed causal sequence. The target's prediction at the top level
(N - 2, j), offset N - 1 + j, is the next token of column j's trajectory. Then:
- harvest: column j read from level 0 to the top, plus that prediction, is an n-gram of N consecutive positions
  (each token the target's prediction after the ones below it, up to the staleness of the lower levels); it goes
  into the pool under its first token, each key keeping the G most recent distinct n-grams;
- shift: level 0 is dropped, levels move down and the predictions become the new top level.
During the first N - 2 steps the window is still growing (level 0 starts as random prompt tokens; each step adds
the predictions as one more level), and nothing is harvested until it has all N - 1 levels.

Window alignment: when a step accepts k tokens the root advances by k, not by the one position the shift assumes.
Like the paper, the window is kept as it is (positions are always offsets from the current root): its tokens are
then slightly stale guesses, which costs some harvest quality but no correctness, because only the verified tree
decides the output; the Jacobi branch is never accepted, only mined for guesses.

Optionally the pool is also fed with the n-grams of the context itself (prompt and committed output), like prompt
lookup with a one-token key: text that repeats is then drafted even before the window has found it.

The branches share one pass: the aux mask hides the window from the tree and the tree from the window, so the
verification logits are the same as without the window. Drafts are deterministic trees with distinct siblings
(q = None), which the exact sampling rule accepts losslessly; the Jacobi predictions use the argmax of the raw logits
in every sampling mode, since they are only guesses.
"""

from __future__ import annotations

import random
import sys
from collections import OrderedDict
from collections.abc import Sequence

import torch

from leapdecode.drafters.base import Draft, StepResult
from leapdecode.sampling import SamplingConfig, argmax_rows


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def window_positions(levels: int, width: int) -> torch.Tensor:
    """[levels * width] offsets from the root of the window tokens, level-major: (l, j) at index l * width + j sits
    at offset l + j + 1 (the root is at 0)."""
    level = torch.arange(levels).repeat_interleave(width)  # [m]
    column = torch.arange(width).repeat(levels)  # [m]
    return level + column + 1


def window_mask(levels: int, width: int) -> torch.Tensor:
    """[m, 1 + m] bool, m = levels * width: which of [root, window tokens] each window token attends to.

    (l, j) sees the root, level 0 at columns <= j (offsets 1 .. j + 1) and its own column at levels <= l (offsets
    j + 1 .. l + j + 1): every position from the root to itself exactly once, which is Jacobi's causal sequence.
    """
    level = torch.arange(levels).repeat_interleave(width)  # [m]
    column = torch.arange(width).repeat(levels)  # [m]
    first_level_before = (level[None, :] == 0) & (column[None, :] <= column[:, None])  # [m, m] (query, key)
    own_column_below = (column[None, :] == column[:, None]) & (level[None, :] <= level[:, None])  # [m, m]
    root = torch.ones(levels * width, 1, dtype=torch.bool)  # [m, 1]
    return torch.cat([root, first_level_before | own_column_below], dim=1)


def harvest(levels: Sequence[Sequence[int]], predictions: Sequence[int]) -> list[tuple[int, ...]]:
    """The n-grams of a full window: column j from level 0 up, then the target's prediction on top of it.

    `levels` [N - 1][W] (oldest first), `predictions` [W] -> W n-grams of N tokens, in column order.
    """
    return [tuple(int(level[j]) for level in levels) + (int(predictions[j]),) for j in range(len(predictions))]


class NgramPool:
    """n-grams keyed by their first token; each key keeps its `per_key` most recently added distinct continuations.

    A continuation is the n-gram without its first token (the key): what to draft after a root equal to the key.
    Adding an n-gram already present makes it the most recent again; past `per_key`, the oldest is dropped.
    """

    def __init__(self, per_key: int) -> None:
        _check_int("per_key", per_key, 1, 1 << 16)
        self.per_key = per_key
        self.table: dict[int, OrderedDict[tuple[int, ...], None]] = {}  # key -> continuations, oldest first

    def add(self, ngram: Sequence[int]) -> None:
        if len(ngram) < 2:
            raise ValueError(f"an n-gram needs at least 2 tokens (a key and a continuation), got {list(ngram)}")
        key, continuation = int(ngram[0]), tuple(int(t) for t in ngram[1:])
        entries = self.table.setdefault(key, OrderedDict())
        if continuation in entries:
            entries.move_to_end(continuation)
        else:
            entries[continuation] = None
            if len(entries) > self.per_key:
                entries.popitem(last=False)

    def get(self, key: int) -> list[tuple[int, ...]]:
        """Continuations of `key`, most recent first."""
        entries = self.table.get(int(key))
        return list(reversed(entries)) if entries else []

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.table.values())

    def state_bytes(self) -> int:
        """Approximate memory: the table, one ordered dict per key and the continuation tuples (token ints are
        counted at 28 bytes each, though small ones are shared by Python)."""
        total = sys.getsizeof(self.table)
        for entries in self.table.values():
            total += sys.getsizeof(entries) + 28
            total += sum(sys.getsizeof(c) + 28 * len(c) for c in entries)
        return total


def build_trie(continuations: Sequence[Sequence[int]], budget: int) -> tuple[list[int], list[int]]:
    """Merge token sequences into a tree of at most `budget` nodes: (tokens, parents), parents before children.

    Sequences are taken in order; a shared prefix becomes one path, so siblings carry distinct tokens (what exact
    sampling over deterministic trees needs). A sequence that does not fit whole keeps the prefix that fits.
    """
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for sequence in continuations:
        parent = -1
        for token in sequence:
            node = child.get((parent, int(token)))
            if node is None:
                if len(tokens) >= budget:
                    break
                node = len(tokens)
                tokens.append(int(token))
                parents.append(parent)
                child[(parent, int(token))] = node
            parent = node
    return tokens, parents


class Lookahead:
    """Lookahead decoding (name "lookahead"): n-grams from a Jacobi window in the verification pass, drafted as a
    tree from a pool keyed by the root token."""

    name = "lookahead"
    description = "lookahead: Jacobi iteration over a window in the same pass harvests n-grams; drafts the root's"

    def __init__(self, window: int = 5, ngram: int = 4, per_key: int = 0, context_ngrams: bool = True,
                 seed: int = 0) -> None:
        """window W: Jacobi trajectories (columns); ngram N: n-gram length, the window has N - 1 levels; per_key G:
        n-grams kept per first token (0 = W, the paper's choice); context_ngrams: also pool the context's own
        n-grams; seed: the random prompt tokens that start the window (fixed, so runs are reproducible)."""
        _check_int("window", window, 1, 256)
        _check_int("ngram", ngram, 2, 32)
        _check_int("per_key", per_key, 0, 1 << 16)
        if not isinstance(context_ngrams, bool):
            raise ValueError(f"context_ngrams must be a bool, got {context_ngrams!r}")
        _check_int("seed", seed, 0, 1 << 62)
        self.window = window
        self.ngram = ngram
        self.per_key = per_key or window
        self.context_ngrams = context_ngrams
        self.seed = seed
        # masks and positions for each level count of the (growing, then full) window: they never change
        self._positions = {n: window_positions(n, window) for n in range(1, ngram)}
        self._masks = {n: window_mask(n, window) for n in range(1, ngram)}
        self._aux_masks: dict[tuple[int, int], torch.Tensor] = {}  # (levels, nodes) -> [m, n + 1 + m]
        self.pool = NgramPool(self.per_key)
        self.levels: list[list[int]] = []  # [levels][W] window tokens, oldest level first
        self._tokens: list[int] = []  # the context seen so far (for its n-grams)
        self._next_start = 0  # first context position whose n-gram is not pooled yet
        self.harvested = 0  # n-grams harvested from the window in this request

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> None:
        """Forget the previous request; start the window as W random prompt tokens (one level)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        rng = random.Random(self.seed)
        self.pool = NgramPool(self.per_key)
        self.levels = [[rng.choice(prompt) for _ in range(self.window)]]
        self._tokens, self._next_start, self.harvested = [], 0, 0
        self._sync(prompt)

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        """The pool's continuations of the root merged into a tree (most recent first, within `budget`), with the
        window riding along as the auxiliary branch."""
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if not self.levels:
            raise RuntimeError("Lookahead.propose before reset")
        self._sync(context)
        tokens, parents = build_trie(self.pool.get(int(context[-1])), budget)
        levels = len(self.levels)
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                     aux_tokens=torch.tensor(self.levels, dtype=torch.long).reshape(-1),  # [m] level-major
                     aux_positions=self._positions[levels],  # [m]
                     aux_mask=self._aux_mask(levels, len(tokens)))  # [m, n + 1 + m]

    def observe(self, step: StepResult) -> None:
        """One Jacobi iteration: the top level's predictions become the new top level; a full window is harvested
        first, then shifted."""
        draft = step.draft
        rows = step.logits[draft.n + 1 :]  # [m, vocab] the window's rows (none if the runner dropped the branch)
        if draft.m == 0 or rows.shape[0] != draft.m or draft.m % self.window:
            return
        levels = draft.aux_tokens.reshape(-1, self.window).tolist()  # [levels][W] the window this step scored
        predictions = argmax_rows(rows[-self.window :])  # [W] from the top level
        if len(levels) == self.ngram - 1:
            for ngram in harvest(levels, predictions):
                self.pool.add(ngram)
            self.harvested += self.window
            levels = levels[1:]
        self.levels = levels + [predictions]

    def _aux_mask(self, levels: int, n: int) -> torch.Tensor:
        """[m, n + 1 + m] the window's mask with n blocked node columns after the root's (cached per shape)."""
        key = (levels, n)
        if key not in self._aux_masks:
            window = self._masks[levels]  # [m, 1 + m]
            blocked = torch.zeros(window.shape[0], n, dtype=torch.bool)  # the window never sees the tree
            self._aux_masks[key] = torch.cat([window[:, :1], blocked, window[:, 1:]], dim=1)
        return self._aux_masks[key]

    def report(self) -> dict:
        """Facts for the request stats."""
        return {"lookahead_window_tokens": self.window * (self.ngram - 1), "lookahead_harvested": self.harvested,
                "lookahead_pool_ngrams": len(self.pool), "lookahead_state_bytes": self.state_bytes()}

    def state_bytes(self) -> int:
        """Approximate memory held by this drafter: the pool, the context copy and the window."""
        return (self.pool.state_bytes() + sys.getsizeof(self._tokens) + 28 * len(self._tokens)
                + self.window * (self.ngram - 1) * 36 + 200)

    def _sync(self, context: Sequence[int]) -> None:
        """Pool the n-grams of the context appended since the last call (when context_ngrams is on). O(new tokens).

        A context that does not extend what was seen (a new request without reset) restarts the context copy; a
        missed mismatch could only cost speed, never correctness.
        """
        if not self.context_ngrams:
            return
        tokens, seen = self._tokens, len(self._tokens)
        if seen and (len(context) < seen or int(context[seen - 1]) != tokens[-1] or int(context[0]) != tokens[0]):
            self._tokens, self._next_start = [], 0
            tokens, seen = self._tokens, 0
        new = context[seen:]
        tokens.extend(new.tolist() if hasattr(new, "tolist") else [int(t) for t in new])
        for start in range(self._next_start, len(tokens) - self.ngram + 1):
            self.pool.add(tokens[start : start + self.ngram])
        self._next_start = max(self._next_start, len(tokens) - self.ngram + 1)
