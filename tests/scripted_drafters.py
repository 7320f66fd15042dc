"""Drafters for tests whose acceptance is known in advance.

Each knows `reference`: the full token sequence (prompt + plain greedy output) and proposes relative to the position
the context has reached, so we know exactly which tokens the target will accept.
"""

from __future__ import annotations

import torch

from leapdecode.drafters.base import Draft


class _Scripted:
    name = "scripted"

    def __init__(self, reference: list[int], vocab_size: int, length: int = 6, seed: int = 0) -> None:
        self.reference, self.vocab_size, self.length = reference, vocab_size, length
        self.rng = torch.Generator().manual_seed(seed)

    def reset(self, prompt, sampling) -> None:
        pass

    def observe(self, step) -> None:
        pass

    def upcoming(self, context) -> list[int]:
        return self.reference[len(context):len(context) + self.length]

    def wrong(self, token: int) -> int:
        """A token guaranteed to differ from `token`."""
        return (token + 1 + int(torch.randint(self.vocab_size - 1, (1,), generator=self.rng))) % self.vocab_size


class RandomDrafter(_Scripted):
    """Random chains and trees: (almost) nothing is accepted, the bonus carries every step."""

    name = "random"

    def propose(self, context, budget):
        n = min(budget, self.length)
        tokens = torch.randint(self.vocab_size, (n,), generator=self.rng).tolist()
        if len(context) % 2:  # alternate chains and random trees
            return Draft.chain(tokens)
        parents = [int(torch.randint(-1, i, (1,), generator=self.rng)) for i in range(n)]  # any earlier node
        return Draft.tree(tokens, parents)


class OracleDrafter(_Scripted):
    """Right for `right` tokens, then wrong: exactly min(right, upcoming) tokens are accepted each step."""

    name = "oracle"

    def __init__(self, reference, vocab_size, right: int, length: int = 6, seed: int = 0) -> None:
        super().__init__(reference, vocab_size, length, seed)
        self.right = right

    def propose(self, context, budget):
        truth = self.upcoming(context)[: min(budget, self.length)]
        tokens = [t if i < self.right else self.wrong(t) for i, t in enumerate(truth)]
        return Draft.chain(tokens)


class OracleTreeDrafter(_Scripted):
    """A tree with a wrong sibling before each right node and a wrong leaf under the right path."""

    name = "oracle-tree"

    def propose(self, context, budget):
        truth = self.upcoming(context)[:3]
        if budget < 2 * len(truth) + 1 or not truth:
            return Draft.empty()
        tokens, parents, parent = [], [], -1
        for t in truth:  # decoy first, then the right token, which becomes the parent of the next level
            tokens += [self.wrong(t), t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        tokens.append(self.wrong(self.reference[len(context) + len(truth)] if len(context) + len(truth) <
                                  len(self.reference) else 0))
        parents.append(parent)
        return Draft.tree(tokens, parents)


class EstimatingDrafter(OracleDrafter):
    """An OracleDrafter that also states its nodes' acceptance chances (as hybrid does, for the server's
    scheduler), `claimed` per node, and records every budget it was offered."""

    name = "estimating"

    def __init__(self, reference, vocab_size, right: int, claimed: float, length: int = 6,
                 name: str = "estimating") -> None:
        super().__init__(reference, vocab_size, right, length)
        self.claimed, self.budgets, self.name = claimed, [], name

    def acceptance_estimates(self, context, budget):
        return [self.claimed] * min(budget, self.length)

    def propose(self, context, budget):
        self.budgets.append(budget)
        return super().propose(context, budget)
