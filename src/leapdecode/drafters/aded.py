"""ADED: an adaptive tri-gram table that imitates the target, searched by Monte Carlo tree search.

The drafter keeps a `TrigramTable` (leapdecode.drafters.trigram): for each token pair, a few weighted successors,
with a bigram fallback for pairs it has not seen. It needs no model. Where its knowledge comes from:

- a table built offline: `leapdecode distill-tables` lets the target write a corpus and counts its tri-grams, so the
  table approximates the target's own output distribution (shipped for the default model and used by default,
  `table=auto`); `leapdecode build-trigrams` counts any text files (option `table=PATH`);
- the prompt, added at `reset` with weight `prompt_weight` (adaptation to the text at hand);
- after every step (`observe`), what the target said: the tri-grams of the emitted tokens (weight 1), and the
  target's `learn_top_k` most likely tokens at the root and at each accepted node, each with weight
  `target_weight * p`, p the target's probability (softmax of its logits). Those rows are real target predictions
  after known pairs, the strongest evidence there is.

The table's rule caps each row's total weight (module trigram), so old evidence fades as new evidence arrives and the
table drifts toward the current text. It persists across requests: a drafter object keeps learning.

Drafting is a Monte Carlo tree search from the last two tokens of the context. Each simulation walks down from
the root choosing, at every node, the child with the best PUCT score

    Q(child) + exploration * P(child) * sqrt(N(node)) / (1 + N(child))

where P is the table's probability of the child's token after its parent's pair, N counts visits and Q is the mean
value of the simulations through the child, measured relative to the node (so Q is comparable at every depth).
Expanding the node's most likely not-yet-expanded successor competes with the children, scored with its prior as
its value. A new node is valued by a random rollout of `rollout_depth` tokens drawn from the table: value =
pi(node) * (1 + sum over the rollout of the product of the drawn tokens' probabilities), pi(node) the product of P
along the node's path, i.e. the table's estimate of the chance that the target accepts down to it, plus the
accepted length the rollout suggests lies beyond. The value is backed up to every ancestor. The search stops when
the tree holds the node budget (`nodes`, capped by the loop's budget), after `simulations` simulations, or when no
node can grow any more; the visited nodes are the draft. Nodes are numbered in creation order, so parents precede
children, and siblings are distinct successors by construction. Rollouts draw from a random.Random seeded with
`seed` at every reset, so drafts are reproducible.

`min_prob` keeps nodes worth verifying: a successor is expanded only while pi(node) >= min_prob. On a CPU a draft
node is not free (SmolLM2-135M at 2 threads: ~50 ms for the root alone, ~86 ms with 8 nodes, ~167 ms with 64), so
the default 0.2 drafts a few likely nodes per step; on a GPU, where 64 nodes cost about as much as one, a small
value (0.01) lets the tree fill the node budget and accept more per step.

Drafts are deterministic trees (q = None), so the output is exactly the target's (greedy) or distributed exactly
as the target's (sampling, by the acceptance rule for deterministic trees); the table and the search only decide
speed.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

from leapdecode.drafters.base import Draft, StepResult
from leapdecode.drafters.shipped import is_auto, shipped_table, shipped_trigrams
from leapdecode.drafters.trigram import TrigramTable
from leapdecode.sampling import SamplingConfig


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ADED:
    """Adaptive tri-gram table + MCTS tree drafter (name "aded").

    nodes: most draft nodes per step (the loop's budget caps it too). simulations: most MCTS simulations per step.
    exploration: the PUCT constant. rollout_depth: tokens drawn per rollout. min_prob: least estimated chance of
    acceptance for a node to be drafted. top_k, cap: successors per context and most weight per context of a new
    table (a loaded table keeps its own). backoff: weight of the bigram row mixed into a pair's successors.
    prompt_weight, target_weight, learn_top_k: how much the prompt's tri-grams and the target's top predictions
    count (see the module docstring). table: a saved table (.npz from build-trigrams or distill-tables), a
    TrigramTable (shared, and updated, by this drafter), "" for an empty one, or "auto": the table shipped for the
    target (leapdecode.drafters.shipped; resolved by from_options), else an empty one. seed: seeds the rollouts at
    every reset.
    """

    name = "aded"
    description = "aded: adaptive tri-gram table learned from the target's output, drafts a tree by MCTS"

    def __init__(self, nodes: int = 64, simulations: int = 128, exploration: float = 1.0, rollout_depth: int = 4,
                 min_prob: float = 0.2, top_k: int = 8, cap: float = 16.0, backoff: float = 1.0,
                 prompt_weight: float = 1.0, target_weight: float = 4.0, learn_top_k: int = 4,
                 table: str | TrigramTable = "auto", seed: int = 0) -> None:
        _check("nodes", _is_int(nodes) and 0 <= nodes <= 1024, "an integer in [0, 1024]", nodes)
        _check("simulations", _is_int(simulations) and 1 <= simulations <= 100_000, "an integer in [1, 100000]",
               simulations)
        _check("rollout_depth", _is_int(rollout_depth) and 0 <= rollout_depth <= 64, "an integer in [0, 64]",
               rollout_depth)
        _check("learn_top_k", _is_int(learn_top_k) and 0 <= learn_top_k <= 64, "an integer in [0, 64]", learn_top_k)
        _check("seed", _is_int(seed), "an integer", seed)
        for name, value, low, high in (("exploration", exploration, 0.0, 100.0), ("min_prob", min_prob, 0.0, 1.0),
                                       ("backoff", backoff, 0.0, 1024.0), ("prompt_weight", prompt_weight, 0.0, 1024.0),
                                       ("target_weight", target_weight, 0.0, 1024.0)):
            _check(name, isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high,
                   f"a number in [{low}, {high}]", value)
        if isinstance(table, TrigramTable):
            self.table = table
        elif isinstance(table, str):
            empty = not table or is_auto(table)  # "auto" without a target (see from_options)
            self.table = TrigramTable(top_k=top_k, cap=cap) if empty else TrigramTable.load(table)
        else:
            raise ValueError(f"table must be a path to a saved tri-gram table, a TrigramTable, 'auto' or '', got "
                             f"{table!r}")
        self.nodes, self.simulations, self.exploration = nodes, simulations, float(exploration)
        self.rollout_depth, self.min_prob, self.backoff = rollout_depth, float(min_prob), float(backoff)
        self.prompt_weight, self.target_weight, self.learn_top_k = float(prompt_weight), float(target_weight), \
            learn_top_k
        self.seed = seed
        self.rng = random.Random(seed)
        self._pair = (-1, -1)  # the context's last two tokens at the last propose (a = -1 when there is one token)
        self._clear_counters()

    @classmethod
    def from_options(cls, kwargs: dict, target: Any = None, **context: Any) -> ADED:
        """Registry entry: table "auto" (the default) becomes (a copy of) the tri-gram table shipped for the
        target, if any and if neither top_k nor cap is asked for."""
        kwargs = dict(kwargs)
        if is_auto(kwargs.get("table", "auto")):
            path = shipped_table(target, "trigrams.npz")
            # a loaded table keeps its own top_k and cap: asking for others means an empty table of that shape
            kwargs["table"] = shipped_trigrams(path) if path and not {"top_k", "cap"} & set(kwargs) else ""
        return cls(**kwargs)

    # ------------------------------------------------------------------ Drafter protocol

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> None:
        """Start a request: reseed the rollouts and add the prompt's tri-grams (the table itself is kept)."""
        self.rng = random.Random(self.seed)
        self._clear_counters()
        t0 = time.perf_counter()
        self.table.add_sequence([int(t) for t in prompt], self.prompt_weight)
        self._observe_seconds += time.perf_counter() - t0

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        t0 = time.perf_counter()
        b = int(context[-1])
        a = int(context[-2]) if len(context) >= 2 else -1
        self._pair = (a, b)
        tokens, parents = self.search(a, b, min(self.nodes, budget))
        self._propose_seconds += time.perf_counter() - t0
        self._proposals += 1
        self._drafted += len(tokens)
        return Draft.tree(tokens, parents) if tokens else Draft.empty()

    def observe(self, step: StepResult) -> None:
        """Learn from the step: the emitted tri-grams, and the target's top tokens at the root and accepted nodes."""
        t0 = time.perf_counter()
        a, b = self._pair
        table = self.table
        sequence = [a, b] + list(step.emitted)  # a may be -1 (one-token context): then only its bigram is added
        for i in range(2, len(sequence)):
            if sequence[i - 2] >= 0:
                table.add(sequence[i - 2], sequence[i - 1], sequence[i])
            table.add(-1, sequence[i - 1], sequence[i])
        if self.learn_top_k and self.target_weight > 0.0:
            tokens = step.draft.tokens.tolist()
            rows = [0] + [node + 1 for node in step.path]  # logits rows: the root, then each accepted node
            pairs = [(a, b)]  # the context pair each row predicts after
            for node in step.path:
                pairs.append((pairs[-1][1], tokens[node]))
            k = min(self.learn_top_k, step.logits.shape[-1])
            top = step.logits[rows].float().softmax(-1).topk(k, dim=-1)  # values, indices: [rows, k]
            for (x, y), probs, ids in zip(pairs, top.values.tolist(), top.indices.tolist()):
                for p, t in zip(probs, ids):
                    if x >= 0:
                        table.add(x, y, t, self.target_weight * p)
                    table.add(-1, y, t, self.target_weight * p)
        self._observe_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ the search

    def search(self, a: int, b: int, budget: int) -> tuple[list[int], list[int]]:
        """MCTS from the context pair (a, b): up to `budget` nodes as (tokens, parents), parents[i] < i."""
        if budget <= 0:
            return [], []
        table, backoff, rng = self.table, self.backoff, self.rng
        cache: dict[tuple[int, int], list[tuple[int, float]]] = {}

        def successors(x: int, y: int) -> list[tuple[int, float]]:
            found = cache.get((x, y))
            if found is None:
                found = cache[(x, y)] = table.successors(x, y, backoff)
            return found

        # node 0 is the root (the context's last token); node i > 0 is draft node i - 1. Parallel lists:
        prev = [a]  # token before the node's token: (prev, token) is the pair its successors follow
        token = [b]
        parent = [-1]
        prior = [1.0]  # P(token | parent's pair) from the table
        reach = [1.0]  # product of priors from the root: the estimated chance the target accepts down to here
        visits = [0]
        value = [0.0]  # sum of simulation values through the node
        kids: list[list[int]] = [[]]
        options: list[list[tuple[int, float]] | None] = [None]  # the node's successors, looked up on first visit
        unexpanded = [0]  # index of the node's next successor (most likely first) not yet a child
        c, min_prob, depth = self.exploration, self.min_prob, self.rollout_depth
        for _ in range(self.simulations):
            if len(token) > budget:
                break
            node, size = 0, len(token)
            while True:
                if options[node] is None:
                    options[node] = successors(prev[node], token[node])
                sqrt_n = math.sqrt(visits[node])
                best, best_score = -1, -math.inf
                for kid in kids[node]:  # Q relative to the node, plus the exploration bonus
                    score = value[kid] / (visits[kid] * reach[node]) + c * prior[kid] * sqrt_n / (1 + visits[kid])
                    if score > best_score:
                        best, best_score = kid, score
                j, found = unexpanded[node], options[node]
                if j < len(found):
                    p = found[j][1]
                    if reach[node] * p < min_prob:  # successors come most likely first: none left is worth it
                        unexpanded[node] = j = len(found)
                    elif p + c * p * sqrt_n > best_score:  # expanding: its prior stands in for its value
                        best = -2
                if best >= 0:
                    node = best
                    continue
                if best == -2:  # expand: the new node is the leaf of this simulation
                    new_token, p = found[j]
                    unexpanded[node] += 1
                    prev.append(token[node])
                    token.append(new_token)
                    parent.append(node)
                    prior.append(p)
                    reach.append(reach[node] * p)
                    visits.append(0)
                    value.append(0.0)
                    kids.append([])
                    options.append(None)
                    unexpanded.append(0)
                    kids[node].append(len(token) - 1)
                    node = len(token) - 1
                break  # node is the leaf (new, or one with nothing left to expand)
            # rollout: draw `depth` tokens from the table below the leaf
            x, y, chance, beyond = prev[node], token[node], 1.0, 0.0
            for _ in range(depth):
                found = successors(x, y)
                if not found:
                    break
                r, pick = rng.random(), found[-1]
                for option in found:
                    r -= option[1]
                    if r < 0.0:
                        pick = option
                        break
                chance *= pick[1]
                beyond += chance
                x, y = y, pick[0]
            result = reach[node] * (1.0 + beyond)
            while node >= 0:  # back up
                visits[node] += 1
                value[node] += result
                node = parent[node]
            if len(token) == size and not any(  # nothing expanded: stop once no node can ever grow again
                    reach[i] >= min_prob if options[i] is None else
                    unexpanded[i] < len(options[i]) and reach[i] * options[i][unexpanded[i]][1] >= min_prob
                    for i in range(size)):
                break
        return token[1:], [p - 1 for p in parent[1:]]  # node i -> draft index i - 1; the root's children get -1

    # ------------------------------------------------------------------ facts

    def state_bytes(self) -> int:
        """Memory held by the drafter: the table (the search's per-step lists are freed after each step)."""
        return self.table.state_bytes() + 512

    def report(self) -> dict:
        steps = max(self._proposals, 1)
        return {"aded_table_contexts": len(self.table), "aded_table_mib": round(self.state_bytes() / 2**20, 2),
                "aded_propose_ms_per_step": round(1e3 * self._propose_seconds / steps, 3),
                "aded_observe_ms_per_step": round(1e3 * self._observe_seconds / steps, 3),
                "aded_nodes_per_step": round(self._drafted / steps, 2)}

    def _clear_counters(self) -> None:
        self._propose_seconds = self._observe_seconds = 0.0
        self._proposals = self._drafted = 0
