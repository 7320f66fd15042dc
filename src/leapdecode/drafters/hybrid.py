"""Hybrid drafter: a copy from the context when the model is repeating it, Token Recycling's tree around it.

The two guesses are good at different things. A copy (prompt lookup: what followed the most recent earlier
occurrence of the context's longest suffix that occurred before, up to `max_ngram` tokens) is right for dozens of
tokens when the answer quotes the prompt, repeats code or loops, and is noise elsewhere. Token Recycling's tree is
right for a token or three almost everywhere, never for long. So every step proposes one tree holding both:

- Each candidate node has an estimated probability of being accepted. Template nodes: from their acceptance counts
  (TreeTemplate.estimates). Copy-chain nodes: from how often a chain of the same match length n was right for d
  tokens, learned every step from the emitted tokens whether or not the chain was drafted (a chain node is
  accepted exactly when the chain agrees with the emitted continuation up to it), starting from the rates counted
  on the target's own answers where they are shipped (`chain_prior`, leapdecode.drafters.chain_stats); optionally
  pooled with how the chains of the current request did in its last few steps (`chain_memory`, off by default).
  Deeper nodes are never more likely than shallower ones in either list.
- The draft keeps the most likely nodes of both lists together. Its size is the loop's budget, or `tree_budget`,
  or with a latency curve (tree_budget="auto") the size that maximises expected tokens per second for *this* step:
  a long, reliable match buys a deep chain; no match leaves the recycling tree alone at its usual size.
- The chain is the first branch; recycling nodes are merged into it like a trie: a recycling node whose parent maps
  onto a chain node and whose token equals that node's child reuses it, so siblings stay distinct (the exact
  sampling rule needs that) and no token is verified twice.

Both parts keep learning every step: the recycling table from every verified node's logits, the chain statistics
from the emitted tokens. `fork()` gives a request that runs at the same time a drafter sharing what was learned.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from leapdecode.budget import LatencyCurve
from leapdecode.drafters.base import Draft, StepResult
from leapdecode.drafters.chain_stats import ChainStats, load_chain_prior
from leapdecode.drafters.pld import PromptLookup, continuation, find_match
from leapdecode.drafters.recycling import TokenRecycling, _check_int, target_options
from leapdecode.drafters.shipped import is_auto, resolve_table
from leapdecode.sampling import SamplingConfig

def merge_chain_and_tree(chain: Sequence[int], tokens: Sequence[int], parents: Sequence[int],
                         limit: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """One draft tree from a chain and a tree (tokens, parents with -1 = root, parents first), at most `limit` nodes.

    The chain comes first (its first `limit` tokens); the tree's nodes follow in order, each either reused (same
    parent, same token as an existing node: the trie merge) or appended while room is left; a node that finds no
    room is dropped with its subtree. Returns (tokens, parents, chain_nodes, origin): chain_nodes[i] is the merged
    index of chain token i, origin[j] the merged index of tree node j (-1 when dropped).
    """
    out_tokens: list[int] = []
    out_parents: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node: one child per token
    chain_nodes: list[int] = []
    parent = -1
    for token in chain[:limit]:
        node = len(out_tokens)
        out_tokens.append(int(token))
        out_parents.append(parent)
        child[(parent, int(token))] = node
        chain_nodes.append(node)
        parent = node
    origin: list[int] = []
    for token, p in zip(tokens, parents):
        mapped_parent = -1 if p < 0 else origin[p]
        if p >= 0 and mapped_parent < 0:
            origin.append(-1)  # the parent was dropped
            continue
        key = (mapped_parent, int(token))
        node = child.get(key)
        if node is None and len(out_tokens) < limit:
            node = len(out_tokens)
            out_tokens.append(int(token))
            out_parents.append(mapped_parent)
            child[key] = node
        origin.append(-1 if node is None else node)
    return out_tokens, out_parents, chain_nodes, origin


class _Lookup(PromptLookup):
    """Prompt lookup that also says how long the matched suffix was (the chain's reliability depends on it)."""

    def match(self, context: Sequence[int], length: int) -> tuple[int, list[int]]:
        self._sync(context)
        buf = self._buf[: self._len]  # [L] view of the context
        n, end = find_match(buf, self.max_ngram, self.min_ngram)
        return (n, continuation(buf, end, length).tolist()) if n else (0, [])


class Hybrid:
    """Copy chain + Token Recycling tree, sized by estimated acceptance (name "hybrid")."""

    skips_steps = True  # steps may go by without propose and observe (Drafter.skips_steps)

    name = "hybrid"
    description = "hybrid: prompt-lookup copy chain plus the token recycling tree, nodes kept by estimated acceptance"

    def __init__(self, max_ngram: int = 4, max_chain: int = 32, top_k: int = 8, template: Any = None,
                 tree_budget: Any = "auto", table_path: str = "auto", vocab_size: int = 0, update: str = "all",
                 chain_memory: float = 0.0, chain_prior: str = "auto",
                 latency_curve: LatencyCurve | None = None) -> None:
        """max_ngram: longest suffix matched for the copy chain (longer matches are more reliable);
        max_chain: longest copy chain drafted. chain_memory: decay per step of the request's recent chain evidence
        pooled with the long-run rates (0, the default = long-run rates alone; see ChainStats: on Spec-Bench with
        SmolLM2 pooling did not pay, BENCHMARKS.md section 5). chain_prior: where the chain rates start: "auto" =
        the counts shipped for the target (chains.json; from_options knows the target), else the built-in guess;
        "" = the built-in guess (CHAIN_PRIOR); or a path to counts (chain_stats.write_chain_counts).
        tree_budget: "auto" (with a latency curve: per step, the size that maximises expected tokens per second;
        without one: the recycling template plus the chain) or an integer cap on all nodes. The rest: the
        recycling part (see TokenRecycling)."""
        _check_int("max_ngram", max_ngram, 1, 16)
        _check_int("max_chain", max_chain, 1, 256)
        self.max_ngram = max_ngram
        self.lookup = _Lookup(max_ngram=max_ngram, min_ngram=1, num_draft_tokens=max_chain)
        if not isinstance(chain_memory, (int, float)) or isinstance(chain_memory, bool) or \
                not 0.0 <= chain_memory < 1.0:
            raise ValueError(f"chain_memory must be a number in [0, 1), got {chain_memory!r}")
        if not isinstance(chain_prior, str):
            raise ValueError(f"chain_prior must be 'auto', '' or a path to chain counts, got {chain_prior!r}")
        prior = load_chain_prior(chain_prior, max_ngram, max_chain) if chain_prior and not is_auto(chain_prior) \
            else None
        self.chain_stats = ChainStats(max_ngram, max_chain, float(chain_memory), prior)
        self.max_chain = max_chain
        self.recycling = TokenRecycling(top_k=top_k, template=template, tree_budget=tree_budget,
                                        table_path=table_path, vocab_size=vocab_size, update=update,
                                        latency_curve=latency_curve)
        self.latency_curve = latency_curve
        # step seconds at 0 .. max size nodes, looked up per step when the size is chosen per step
        self._latency = None if latency_curve is None or not self.recycling.auto else \
            np.array([latency_curve.latency(b) for b in range(latency_curve.max_size + 1)])
        self._match: tuple[int, list[int]] = (0, [])  # (n, chain) found at the last propose
        self._chain_nodes: list[int] = []  # merged node index of each drafted chain token
        self._selected: list[int] = []  # template nodes selected for the last draft
        self._origin: dict[int, int] = {}  # merged node -> template index, for the recycling nodes drafted
        self._last_draft: Draft | None = None
        self._planned: tuple | None = None  # (context, limit, n, chain, ranked, merged): the last _plan, until observe
        self.steps = self.nodes = self.chain_nodes = 0  # facts for the stats

    @classmethod
    def from_options(cls, kwargs: dict[str, Any], target: Any = None, **context: Any) -> Hybrid:
        """Registry entry: like TokenRecycling, measure or load the target's latency curve for tree_budget=auto and
        start from the table and the chain counts shipped for the target where table_path and chain_prior are
        "auto"."""
        kwargs = target_options(kwargs, target)
        kwargs["chain_prior"] = resolve_table(kwargs.get("chain_prior", "auto"), target, "chains.json")
        return cls(**kwargs)

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> None:
        """New request: the copy index and the recent chain evidence restart; the recycling table and the
        long-run acceptance statistics are kept (warm start)."""
        self.lookup.reset(prompt, sampling)
        self.recycling.reset(prompt, sampling)
        self.chain_stats.new_request()
        self._clear_step()

    def _clear_step(self) -> None:
        """Drop what the last propose left for observe."""
        self._match, self._chain_nodes, self._selected, self._origin, self._last_draft = (0, []), [], [], {}, None
        self._planned = None

    def fork(self) -> Hybrid:
        """A drafter for another request running at the same time (the server's share_drafter_state): it shares the
        recycling table and the template's and the chains' acceptance counts, and has its own copy index, recent
        chain evidence and step state. Output stays exact whatever the shared state holds; only the drafts depend on
        what other requests taught it."""
        other = copy.copy(self)
        other.lookup = _Lookup(max_ngram=self.max_ngram, min_ngram=1, num_draft_tokens=self.max_chain)
        other.recycling = self.recycling.fork()
        other.chain_stats = self.chain_stats.fork()
        other._clear_step()
        other.steps = other.nodes = other.chain_nodes = 0
        return other

    def acceptance_estimates(self, context: Sequence[int], budget: int) -> np.ndarray:
        """[<= budget] the estimated probability that each node of a draft for this context is accepted, most
        likely first: the expected accepted tokens of a k-node draft are the sum of the first k. The server's
        scheduler uses them to share a step's rows among the sequences of a batch, then calls propose for the
        same context, which reuses this step's match and ranking (_plan)."""
        _, _, _, merged = self._plan(context, budget)
        return np.array([-p for p, _ in merged[: self._cap(budget, len(merged))]])

    def _plan(self, context: Sequence[int], limit: int) -> tuple[int, list[int], np.ndarray, list[tuple[float, int]]]:
        """(match length n, copy chain, the template's nodes by estimate, the `limit` most likely nodes of the chain
        and the template merged, most likely first, as (-probability, 0 for a chain node or 1 for a template node)).
        Computed once per context and step (nothing it reads changes before observe), again only for a larger
        limit."""
        key = tuple(context)
        if self._planned is not None and self._planned[0] == key and self._planned[1] >= limit:
            return self._planned[2:]
        n, chain = self.lookup.match(context, self.max_chain)
        chain_p = self.chain_stats.probs(n)[: len(chain)] if n else np.zeros(0)  # [len(chain)] non-increasing
        template = self.recycling.template
        ranked = template.ranked()
        template_p = template.estimates()[ranked]  # [T] non-increasing
        merged = list(itertools.islice(heapq.merge(((-p, 0) for p in chain_p), ((-p, 1) for p in template_p)),
                                       max(limit, 0)))  # most likely first
        self._planned = (key, limit, n, chain, ranked, merged)
        return n, chain, ranked, merged

    def _cap(self, budget: int, available: int) -> int:
        """The most nodes a draft may have: the budget, the candidates, the latency curve's range or a fixed
        tree_budget."""
        cap = min(max(budget, 0), available)
        if self._latency is not None:
            return min(cap, len(self._latency) - 1)
        return cap if self.recycling.auto else min(cap, self.recycling.tree_budget)

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self._origin, self._chain_nodes, self._selected = {}, [], []
        n, chain, ranked, merged = self._plan(context, budget)
        self._match = (n, chain)  # observe learns the chain's reliability whether or not it is drafted
        size, n_chain = self._choose(merged, budget)
        self.steps += 1
        if size == 0:
            self._last_draft = Draft.empty()
            return self._last_draft
        root, chain, take = int(context[-1]), chain[:n_chain], size - n_chain
        template = self.recycling.template
        for _ in range(3):  # template nodes that coincide with chain nodes free their slot for the next ones
            self._selected = sorted(ranked[:take])
            tokens, parents, template_nodes = self.recycling.table.expand(root, template, self._selected)
            merged, merged_parents, self._chain_nodes, origin = merge_chain_and_tree(chain, tokens, parents, size)
            shared = size - len(merged) if len(tokens) == take else 0  # slots lost to merging, not to empty rows
            if shared <= 0 or take >= len(ranked):
                break
            take += shared
        for j, node in enumerate(origin):
            if node >= 0:
                self._origin[node] = template_nodes[j]
        self.nodes += len(merged)
        self.chain_nodes += len(self._chain_nodes)
        draft = Draft.tree(merged, merged_parents) if merged else Draft.empty()
        self._last_draft = draft
        return draft

    def _choose(self, merged: list[tuple[float, int]], budget: int) -> tuple[int, int]:
        """(draft size, how many of its nodes are chain nodes): the most likely nodes of both lists (`merged`, see
        _plan), as many as the cap allows, or (auto with a curve) as many as maximise expected tokens per second."""
        cap = self._cap(budget, len(merged))
        if self._latency is not None:
            expected = 1.0 - np.cumsum([0.0] + [p for p, _ in merged[:cap]])  # [cap + 1] 1 + sum of p (p negated)
            size = int(np.argmax(expected / self._latency[: cap + 1]))
        else:  # no curve: all the cap allows (the whole template plus the chain, or a fixed tree_budget)
            size = cap
        return size, sum(1 for _, source in merged[:size] if source == 0)

    def observe(self, step: StepResult) -> None:
        self._planned = None  # what it learns now changes the estimates
        self.recycling.learn(step)
        n, chain = self._match
        if n:  # learn how reliable a chain of this match length is, drafted or not
            self.chain_stats.record(n, chain, step.emitted)
        if step.draft is self._last_draft and self._selected:  # count the template nodes tried and accepted
            self.recycling.record(self._selected, [self._origin[node] for node in step.path if node in self._origin])

    def save(self, path) -> None:
        self.recycling.save(path)

    def load(self, path) -> None:
        self.recycling.load(path)

    def report(self) -> dict[str, Any]:
        out = self.recycling.report()
        out.update(mean_draft_nodes=round(self.nodes / max(self.steps, 1), 2),
                   mean_chain_nodes=round(self.chain_nodes / max(self.steps, 1), 2))
        return out

    def state_bytes(self) -> int:
        return self.recycling.state_bytes() + self.lookup.state_bytes() + int(self.chain_stats.at_risk.nbytes * 2)
