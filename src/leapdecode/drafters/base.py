"""The drafter interface: a Draft (a token tree) and the Drafter protocol.

A draft is a tree of n nodes. Node i carries `tokens[i]` and `parents[i]`: the index of its parent node, or -1 when
it is a child of the root (the last committed token). Parents always come before their children (parents[i] < i),
so a chain is simply parents = [-1, 0, 1, ..., n-2].

`q`, when present, is the drafter's own distribution for each node: q[i] is the distribution the drafter drew
tokens[i] from (its distribution at node i's parent). Deterministic drafters leave q as None: the acceptance rule
then treats each drafted token as a one-hot proposal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from leapdecode.sampling import SamplingConfig


@dataclass(frozen=True)
class Draft:
    tokens: torch.Tensor  # [n] int64, the drafted token of each node
    parents: torch.Tensor  # [n] int64, parent node index, -1 = child of the root
    q: torch.Tensor | None = None  # [n, vocab] float32, drafter distribution each token was drawn from
    # An optional auxiliary branch that rides the same forward pass without being verified (Lookahead's Jacobi
    # window): m tokens at positions root + aux_positions; aux_mask says which of [root, n nodes, m aux tokens] each
    # aux token attends to (the committed prefix is always visible). Its logits come back after the nodes' rows.
    aux_tokens: torch.Tensor | None = None  # [m] int64
    aux_positions: torch.Tensor | None = None  # [m] int64, offsets from the root's position (root = 0)
    aux_mask: torch.Tensor | None = None  # [m, n + 1 + m] bool

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.parents.shape != self.tokens.shape:
            raise ValueError(f"Draft needs 1-D tokens and parents of equal length, got {tuple(self.tokens.shape)} "
                             f"and {tuple(self.parents.shape)}")
        n = self.tokens.numel()
        if n and bool((self.parents >= torch.arange(n)).any() or (self.parents < -1).any()):
            raise ValueError(f"Draft parents must satisfy -1 <= parents[i] < i, got {self.parents.tolist()}")
        if self.q is not None and (self.q.ndim != 2 or self.q.shape[0] != n):
            raise ValueError(f"Draft q must be [n, vocab] with n={n}, got {tuple(self.q.shape)}")
        if self.aux_tokens is not None:
            m = self.aux_tokens.numel()
            if self.aux_positions is None or self.aux_positions.shape != (m,) or self.aux_mask is None \
                    or self.aux_mask.shape != (m, n + 1 + m):
                raise ValueError(f"Draft aux branch needs aux_positions [m] and aux_mask [m, n + 1 + m] with m={m}")

    @property
    def m(self) -> int:
        """Number of auxiliary (unverified) tokens riding the pass."""
        return 0 if self.aux_tokens is None else self.aux_tokens.numel()

    @property
    def n(self) -> int:
        return self.tokens.numel()

    @property
    def is_chain(self) -> bool:
        return bool(torch.equal(self.parents, torch.arange(-1, self.n - 1)))

    @staticmethod
    def empty() -> Draft:
        return Draft(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @staticmethod
    def chain(tokens: Sequence[int] | torch.Tensor, q: torch.Tensor | None = None) -> Draft:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return Draft(tokens, torch.arange(-1, tokens.numel() - 1), q)

    @staticmethod
    def tree(tokens: Sequence[int], parents: Sequence[int]) -> Draft:
        return Draft(torch.as_tensor(tokens, dtype=torch.long).reshape(-1),
                     torch.as_tensor(parents, dtype=torch.long).reshape(-1))


@dataclass(frozen=True)
class StepResult:
    """What the target said in one step; handed to `Drafter.observe` so drafters can learn from it."""

    root: int  # the token the step was rooted at (last committed token before the step)
    draft: Draft
    logits: torch.Tensor  # [n + 1 + m, vocab] raw target logits: row 0 root, row i + 1 node i, then aux tokens
    path: list[int]  # accepted draft node indices, root to leaf
    bonus: int  # token the target emitted after the last accepted node
    emitted: list[int] = field(default_factory=list)  # accepted tokens followed by the bonus


@runtime_checkable
class Drafter(Protocol):
    """Anything that proposes continuations of the context as a token tree.

    `context` is the whole token sequence so far (prompt + generated), whose last element is the root.
    `budget` is the largest number of nodes the target will verify this step; a drafter may propose fewer,
    including none (an empty draft means plain decoding for that step).

    Optional: `fork() -> Drafter`, a drafter for another request that runs at the same time and shares what this
    one has learned (a table, acceptance counts), with its own per-request state; the server uses it with
    --share-drafter-state. Forks are used from one thread (the server's scheduler); only fork() itself may run
    elsewhere.

    Optional: `acceptance_estimates(context, budget) -> sequence of float`, the estimated probability that each
    node of the draft it would propose for this context is accepted, most likely first, at most `budget` of them
    (the expected accepted tokens of a k-node draft are the sum of the first k). The server's scheduler uses them to
    share a batch step's rows among its sequences (draft_length.choose_draft_lengths); without them it models a
    drafter from its recent acceptance.

    Optional: `skips_steps = True` where steps may go by without propose and observe (both left out together):
    the drafter reads what it needs from the context it is given next. The server's scheduler then lets it rest
    while its drafts do not pay for its own work (draft_length.DrafterUpkeep).
    """

    name: str

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig) -> None: ...

    def propose(self, context: Sequence[int], budget: int) -> Draft: ...

    def observe(self, step: StepResult) -> None: ...
