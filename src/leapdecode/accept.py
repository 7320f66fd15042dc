"""Exact acceptance rules: pure functions from (draft, target logits) to the accepted path and the bonus token.

Row 0 of `logits` / `p` is the target at the root; row i + 1 is the target at draft node i.

- Greedy: follow the child whose token equals argmax p; the bonus is argmax p at the last accepted node.
- Sampling: recursive rejection sampling over each node's children (SpecInfer). For a child x drawn from q:
  accept with probability min(1, p(x) / q(x)); on rejection p <- norm(max(0, p - q)) and try the next child; when
  no child is accepted, the bonus is drawn from what is left of p. A deterministic child has a one-hot q, which
  makes this "accept x with probability p(x), else remove x from p": for distinct siblings that is the same as
  drawing y ~ p and descending into the child whose token is y. A chain with q is the one-child case at every node.
  Each step is exact, so the emitted tokens are distributed exactly as the warped target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leapdecode.drafters.base import Draft
from leapdecode.sampling import SamplingConfig, argmax_rows, sample, warp
from leapdecode.tree import children


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # accepted draft node indices, root to leaf
    bonus: int  # the target's own token after the last accepted node (the correction at a rejection)


def accept_greedy(draft: Draft, logits: torch.Tensor) -> Acceptance:
    """logits [n + 1, vocab]. Walk from the root along children equal to the target's argmax."""
    best = argmax_rows(logits)  # [n + 1] target's greedy token at the root and at each node
    tokens = draft.tokens.tolist()
    kids = children(draft.parents)
    path: list[int] = []
    node = -1
    while True:
        row = node + 1
        match = next((c for c in kids[node] if tokens[c] == best[row]), None)
        if match is None:
            return Acceptance(path, best[row])
        path.append(match)
        node = match


def accept_sampled(draft: Draft, p: torch.Tensor, generator: torch.Generator) -> Acceptance:
    """p [n + 1, vocab]: warped target distributions. Recursive rejection sampling down the tree."""
    tokens = draft.tokens.tolist()
    kids = children(draft.parents)
    path: list[int] = []
    node = -1
    while True:
        residual = p[node + 1]  # [vocab] what the target still wants at this node
        accepted = None
        for child in kids[node]:
            x = tokens[child]
            if draft.q is None:  # one-hot q: accept with probability p(x)
                ratio = residual[x]
                q_child = None
            else:
                q_child = draft.q[child].to(residual.device)  # [vocab]
                ratio = residual[x] / q_child[x].clamp_min(1e-20)
            u = torch.rand((), generator=generator, device=residual.device)
            if bool(u < ratio):
                accepted = child
                break
            residual = _remove(residual, x, q_child)
        if accepted is None:
            return Acceptance(path, sample(residual, generator))
        path.append(accepted)
        node = accepted


def _remove(p: torch.Tensor, x: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, p - q)) after rejecting a child drawn from q (one-hot at x when q is None)."""
    if q is None:
        left = p.clone()
        left[x] = 0.0
    else:
        left = (p - q).clamp_min(0.0)
    total = left.sum()
    # total is 0 only if p <= q everywhere, i.e. p == q, where rejection has probability 0; keep p to stay defined
    return left / total if bool(total > 0) else p


def accept(draft: Draft, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> Acceptance:
    """Apply the exact rule for `sampling` to raw target logits [n + 1, vocab]."""
    if sampling.greedy:
        return accept_greedy(draft, logits)
    return accept_sampled(draft, warp(logits, sampling), generator)
