"""Token Recycling: reuse the target's own top-k guesses, remembered per token, as a draft tree.

Every verification step computes the target's logits at the root and at every draft node, and nearly all of them are
thrown away: rejected nodes, and everything but the argmax of the accepted ones. Token Recycling keeps them in an
adjacency table [vocab, k]: row t holds the target's k most likely next tokens the most recent time it saw a node
carrying token t (whatever that node's context was). The next draft follows the table from the root: the root's
row gives the first level, each of those tokens' rows the second, and so on.

Which entries are followed is fixed by a static tree template, a list of index paths: path (i,) is entry i of the
root's row, path (i, j) is entry j of the row of the token at (i,), and so on. The template is stored breadth-first
(shorter paths first), so parents precede children and the first b nodes whose parents are kept form a valid tree.
The default template is built best-first from per-rank acceptance rates (wide near the root, a deep spine along
rank 0). A node whose parent token has no row yet (never seen) is skipped with its subtree.

Siblings carry distinct tokens because they are distinct entries of one table row, and a row is written whole from
one top-k (sampling.top_k_rows: distinct indices): the exact sampling rule for deterministic trees relies on that.

After each step the rows of the root and of every verified node's token are overwritten with the target's top-k at
that node, accepted or not, from one top-k over all rows. The table outlives `reset()` (warm start across
requests) and can be saved and loaded. Memory: vocab x k int32 (SmolLM2, k = 8: 1.5 MiB).

Tree size: the template can be pruned to a budget by estimated acceptance. Each template node counts how often it was
on the accepted path; with a prior from the template's construction this gives P(node accepted) per step, and the
kept nodes are the most likely ones (a child is never more likely than its parent, so the kept set is a valid tree).
With a measured latency curve of the target (leapdecode.budget), the budget is the size that maximises expected
tokens per second, re-chosen as the estimates move.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leapdecode.budget import LatencyCurve, cached_latency_curve, choose_budget
from leapdecode.drafters.base import Draft, StepResult
from leapdecode.drafters.shipped import AUTO, is_auto, resolve_table
from leapdecode.sampling import SamplingConfig, top_k_rows

TABLE_FORMAT = 1
# P(the rank-r entry of a row is the target's next token | the parent node was accepted), measured on
# SmolLM2-135M-Instruct greedy decoding of the first 10 questions of each Spec-Bench category (128 new tokens,
# 6k steps, table warming up over the run): about the same at depths 1, 2 and 3 (scripts/measure_drafters.py).
DEFAULT_RANK_ACCEPTANCE = (0.42, 0.10, 0.053, 0.03, 0.021, 0.014, 0.011, 0.008)
UPDATES = ("all", "path")
DEFAULT_TEMPLATE_NODES = 80
DEFAULT_TEMPLATE_DEPTH = 6
PRIOR_STEPS = 16.0  # weight of the template prior in the acceptance estimates, in steps of evidence
RECHOOSE_EVERY = 16  # steps between two choices of the budget from the latency curve


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def best_first_template(rank_acceptance: Sequence[float], nodes: int, max_depth: int) -> list[tuple[int, ...]]:
    """The `nodes` index paths of highest prior score, score(path) = prod(rank_acceptance[i] for i in path),
    no deeper than `max_depth`, in breadth-first order.

    The score is the probability that the path is accepted if each level accepts rank r with probability
    rank_acceptance[r] independently; a path scores at most its parent, so the best-first set is a valid tree.
    """
    _check_int("nodes", nodes, 1, 1 << 16)
    _check_int("max_depth", max_depth, 1, 64)
    weights = [float(w) for w in rank_acceptance]
    if not weights or any(not (0.0 < w <= 1.0) for w in weights):
        raise ValueError(f"rank_acceptance must be non-empty probabilities in (0, 1], got {rank_acceptance!r}")
    heap = [(-w, (r,)) for r, w in enumerate(weights)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < nodes:
        neg_score, path = heapq.heappop(heap)  # ties: the lexicographically smaller path first (lower ranks)
        chosen.append(path)
        if len(path) < max_depth:
            for r, w in enumerate(weights):
                heapq.heappush(heap, (neg_score * w, path + (r,)))
    return sorted(chosen, key=lambda p: (len(p), p))


def parse_template(spec: str) -> list[tuple[int, ...]]:
    """"0;1;0,0;0,1" -> [(0,), (1,), (0, 0), (0, 1)]: paths separated by ';' (or whitespace), indices by ','."""
    paths = []
    for item in spec.replace(";", " ").split():
        try:
            paths.append(tuple(int(v) for v in item.split(",")))
        except ValueError:
            raise ValueError(f"template path {item!r} is not comma-separated integers") from None
    return paths


class TreeTemplate:
    """A static draft tree of index paths, with per-node acceptance estimates for pruning to a budget."""

    def __init__(self, paths: Sequence[Sequence[int]], top_k: int, prior: Sequence[float] | None = None) -> None:
        canon = [tuple(int(i) for i in p) for p in paths]
        if not canon:
            raise ValueError("template must hold at least one path")
        if len(set(canon)) != len(canon):
            raise ValueError("template paths must be distinct")
        known = set(canon)
        for p in canon:
            if not p or any(not 0 <= i < top_k for i in p):
                raise ValueError(f"template path {list(p)} must be non-empty with indices in [0, top_k={top_k})")
            if len(p) > 1 and p[:-1] not in known:
                raise ValueError(f"template path {list(p)} lacks its parent {list(p[:-1])}")
        self.paths = sorted(canon, key=lambda p: (len(p), p))  # breadth-first: parents first
        position = {p: i for i, p in enumerate(self.paths)}
        self.parent = [position[p[:-1]] if len(p) > 1 else -1 for p in self.paths]  # [T] template index, -1 root
        self.column = [p[-1] for p in self.paths]  # [T] entry of the parent token's row
        self.depth = max(len(p) for p in self.paths)
        if prior is None:
            ranks = DEFAULT_RANK_ACCEPTANCE
            prior = [float(np.prod([ranks[min(i, len(ranks) - 1)] for i in p])) for p in self.paths]
        self.prior = np.asarray(prior, dtype=np.float64)  # [T] prior P(node on the accepted path)
        self.trials = np.zeros(len(self.paths))  # [T] steps in which the node was selected for the draft
        self.hits = np.zeros(len(self.paths))  # [T] of those, steps in which it was on the accepted path
        self._est: np.ndarray | None = None  # cached estimates and ranking, until the counts change
        self._ranked: list[int] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def estimates(self) -> np.ndarray:
        """[T] estimated P(node is on the accepted path) in a step that drafts it: its hits over the steps that
        selected it, blended with the prior, then capped by the parent's estimate (a node is accepted only if its
        parent is). Counting only steps that selected the node keeps a pruned-away node at its last estimate
        instead of letting it decay to zero for never being tried."""
        if self._est is None:
            est = (self.hits + PRIOR_STEPS * self.prior) / (self.trials + PRIOR_STEPS)
            for i, p in enumerate(self.parent):  # breadth-first: the parent is final when its child is visited
                if p >= 0 and est[i] > est[p]:
                    est[i] = est[p]
            self._est = est
        return self._est

    def ranked(self) -> list[int]:
        """Template indices ordered by estimated acceptance, ties to the lower index. Every prefix of this order is
        a valid tree: a child's estimate is at most its parent's and its index is higher."""
        if self._ranked is None:
            est = self.estimates()
            self._ranked = sorted(range(len(self.paths)), key=lambda i: (-est[i], i))
        return self._ranked

    def select(self, budget: int) -> list[int]:
        """The `budget` most likely template nodes, in breadth-first (template) order."""
        if budget >= len(self.paths):
            return list(range(len(self.paths)))
        return sorted(self.ranked()[:budget])

    def expected_tokens(self) -> np.ndarray:
        """[T + 1] expected tokens per step with the best b nodes kept: 1 (the bonus) + their summed estimates."""
        est = self.estimates()
        order = self.ranked()
        return np.concatenate([[1.0], 1.0 + np.cumsum(est[order])])

    @property
    def steps(self) -> int:
        """Steps counted (each selects at least the most likely node, so its trials count them all)."""
        return int(self.trials.max()) if len(self.trials) else 0

    def record(self, selected: Sequence[int], accepted: Sequence[int]) -> None:
        """Count one step that selected the template nodes `selected`, of which `accepted` were on the accepted
        path."""
        self.trials[list(selected)] += 1
        self.hits[list(accepted)] += 1
        self._est = self._ranked = None


class RecyclingTable:
    """The adjacency table: row t = the target's top-k next tokens after token t (-1 while unseen)."""

    def __init__(self, top_k: int, vocab_size: int | None = None) -> None:
        self.top_k = top_k
        self.vocab_size: int | None = None
        self.table: np.ndarray | None = None  # [vocab, top_k] int32, allocated once the vocab size is known
        if vocab_size is not None:
            self._allocate(vocab_size)

    def _allocate(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.table = np.full((vocab_size, self.top_k), -1, dtype=np.int32)  # [vocab, k]

    def update(self, tokens: Sequence[int] | torch.Tensor, logits: torch.Tensor,
               order: Sequence[int] | None = None) -> None:
        """Overwrite row tokens[i] with the top-k of logits[i] ([r] tokens, [r, vocab] logits), for the rows i in
        `order` (default: all, in order). When a token occurs at several of those rows, the one latest in `order`
        wins (callers put the most trusted rows last). Reordering the small top-k result rather than the logits
        avoids copying [r, vocab] floats."""
        if self.table is None:
            self._allocate(int(logits.shape[-1]))
        elif logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns but the table has vocab {self.vocab_size}")
        k = min(self.top_k, self.vocab_size)
        top = top_k_rows(logits, k).astype(np.int32)  # [r, k] distinct per row
        if top.shape[0] == 1:  # a step that drafted nothing: the root's row alone
            self.table[int(tokens[0]), :k] = top[0]
            return
        rows = np.asarray(tokens, dtype=np.int64).reshape(-1)  # [r]
        if order is not None:
            order = np.asarray(order, dtype=np.int64)
            rows, top = rows[order], top[order]
        # the last occurrence of each token: first occurrence in the reversed array
        _, last_from_end = np.unique(rows[::-1], return_index=True)
        keep = rows.shape[0] - 1 - last_from_end  # [u]
        self.table[rows[keep], :k] = top[keep]

    @classmethod
    def from_predictions(cls, tokens: np.ndarray, top: np.ndarray, probs: np.ndarray, vocab_size: int,
                         top_k: int = 8) -> RecyclingTable:
        """A warm table from the target's predictions over a corpus (leapdecode.distill): tokens [P] the token at
        each position, top [P, k'] and probs [P, k'] the target's most likely next tokens there and their
        probabilities. Row t keeps the top_k successors with the most probability summed over t's occurrences
        (the online rule keeps only the latest occurrence; over a corpus the sum is the better prior)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)  # [P]
        top, probs = np.asarray(top, dtype=np.int64), np.asarray(probs, dtype=np.float64)  # [P, k']
        if top.shape != probs.shape or top.ndim != 2 or top.shape[0] != tokens.shape[0]:
            raise ValueError(f"tokens [P], top [P, k] and probs [P, k] disagree: {tokens.shape}, {top.shape}, "
                             f"{probs.shape}")
        if tokens.size and (min(tokens.min(), top.min()) < 0 or max(tokens.max(), top.max()) >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        table = cls(top_k, vocab_size)
        pairs = (np.repeat(tokens, top.shape[1]) * vocab_size + top.reshape(-1))  # [P * k'] token * V + successor
        keys, inverse = np.unique(pairs, return_inverse=True)
        mass = np.bincount(inverse, weights=probs.reshape(-1))  # [U] summed probability per (token, successor)
        row, succ = keys // vocab_size, keys % vocab_size
        order = np.lexsort((-mass, row))  # by token, heaviest successor first
        row, succ = row[order], succ[order]
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        rank = np.arange(row.size) - np.repeat(starts, np.diff(np.r_[starts, row.size]))
        keep = rank < top_k
        table.table[row[keep], rank[keep]] = succ[keep]
        return table

    def filled_rows(self) -> int:
        return 0 if self.table is None else int((self.table[:, 0] >= 0).sum())

    def save(self, path: str | Path) -> None:
        if self.table is None:
            raise ValueError("the table is empty (no step observed and no vocab size given): nothing to save")
        torch.save({"format": TABLE_FORMAT, "vocab_size": self.vocab_size, "top_k": self.top_k,
                    "table": torch.from_numpy(self.table.copy())}, Path(path))

    def load(self, path: str | Path) -> None:
        """Load a saved table. Refused when its vocab differs from this table's (a table of another tokenizer is
        nonsense here). A wider table keeps its first top_k ranks; a narrower one fills the first ranks and leaves
        the rest empty (-1) until decoding writes whole rows."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"token recycling table {str(path)!r} not found (write one with the drafter's "
                                    f"save() or `leapdecode distill-tables`)")
        vocab, k, table = _read_table(Path(path))
        if self.vocab_size is not None and vocab != self.vocab_size:
            raise ValueError(f"table {path} has vocab {vocab}, this drafter's vocab is {self.vocab_size}")
        out = np.full((vocab, self.top_k), -1, dtype=np.int32)  # [vocab, top_k]
        out[:, : min(k, self.top_k)] = table[:, : self.top_k]
        self.vocab_size, self.table = vocab, out

    def expand(self, root: int, template: TreeTemplate, nodes: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """Follow the table from `root` along the template nodes `nodes` (breadth-first, parents included).

        Returns draft tokens, draft parents (-1 = root) and the template index of each draft node. Nodes whose
        parent token has no row (or whose parent was skipped) are skipped. Plain Python over <= a few hundred
        nodes: one table lookup each, no tensor ops.
        """
        table = self.table
        tokens: list[int] = []
        parents: list[int] = []
        origin: list[int] = []
        if table is None or not 0 <= root < table.shape[0]:
            return tokens, parents, origin
        slot = {-1: -1}  # template index -> draft node index of the expanded nodes (-1: the root)
        token_at = {-1: root}
        parent, column = template.parent, template.column
        for i in nodes:
            p = parent[i]
            if p not in slot:
                continue  # parent skipped: so is its subtree
            token = int(table[token_at[p], column[i]])
            if token < 0:
                continue  # the parent's token has no row yet
            slot[i] = len(tokens)
            token_at[i] = token
            tokens.append(token)
            parents.append(slot[p])
            origin.append(i)
        return tokens, parents, origin


def _read_table(path: Path) -> tuple[int, int, np.ndarray]:
    """(vocab, k, table [vocab, k] int32, read-only) of a saved table, checked. Kept in memory per file version
    (path, size, modification time): a server builds a drafter per request from the same shipped table, and
    reading and checking it each time sat on every request's path."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _TABLES:
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise ValueError(f"{path} is not a token recycling table (format {TABLE_FORMAT})")
        vocab, k, table = int(data["vocab_size"]), int(data["top_k"]), data["table"].numpy().astype(np.int32)
        if table.shape != (vocab, k) or table.min() < -1 or table.max() >= vocab:
            raise ValueError(f"table {path} is malformed (shape {tuple(table.shape)}, ids outside [-1, {vocab}))")
        ordered = np.sort(table, axis=1)
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
            raise ValueError(f"table {path} has a row with a repeated token (siblings must be distinct)")
        table.flags.writeable = False  # shared by every drafter loaded from it; each copies it into its own table
        if len(_TABLES) >= 8:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = (vocab, k, table)
    return _TABLES[key]


_TABLES: dict[tuple[str, int, int], tuple[int, int, np.ndarray]] = {}  # _read_table's checked tables


def target_options(kwargs: dict[str, Any], target: Any) -> dict[str, Any]:
    """The options of a recycling-table drafter (recycling, hybrid) completed from the loaded target: its vocab
    size, its latency curve when tree_budget is "auto" (measured once, cached per model and device), and the table
    shipped for it when table_path is "auto"."""
    kwargs = dict(kwargs)
    if target is not None:
        kwargs.setdefault("vocab_size", target.vocab_size)
        if is_auto(kwargs.get("tree_budget", AUTO)):
            kwargs["latency_curve"] = cached_latency_curve(target)
    kwargs["table_path"] = resolve_table(kwargs.get("table_path", AUTO), target, "recycling.pt")
    return kwargs


class TokenRecycling:
    """Token Recycling (name "recycling"): a static tree template expanded through the target's remembered top-k.

    TokenRecycling() drafts the whole template (the paper's setting, right for a GPU where 80 nodes cost about
    one step). For a tree sized to the device, give it the target's latency curve:
    TokenRecycling(latency_curve=leapdecode.budget.cached_latency_curve(model)); the CLI and server do that
    (from_options) whenever tree_budget is "auto".
    """

    skips_steps = True  # steps may go by without propose and observe (Drafter.skips_steps)

    name = "recycling"
    description = "token recycling: adjacency table of the target's top-k next tokens, expanded along a tree template"

    def __init__(self, top_k: int = 8, template: Any = None, tree_budget: Any = "auto", table_path: str = "auto",
                 vocab_size: int = 0, update: str = "all", latency_curve: LatencyCurve | None = None) -> None:
        """
        top_k: width of the table (entries remembered per token).
        template: index paths (a list of int sequences, or a string "0;1;0,0;..."); None = the default ~80-node,
            6-level template built from DEFAULT_RANK_ACCEPTANCE.
        tree_budget: "auto" = choose the size from `latency_curve` (the whole template when there is none), or an
            integer cap on the nodes per step (pruned by estimated acceptance).
        table_path: a saved table to start from (warm start across processes); "" = start empty; "auto" = the
            table shipped for the target (leapdecode.drafters.shipped; from_options knows the target), else empty.
        vocab_size: the target's vocabulary size; 0 = learn it from the first logits seen.
        update: "all" = after a step overwrite the rows of every verified node's token (rejected ones too);
            "path" = only the root and the accepted path overwrite rows, rejected nodes only fill empty rows.
        latency_curve: the target's measured step latency (leapdecode.budget); from_options measures or loads it.
        """
        _check_int("top_k", top_k, 1, 256)
        _check_int("vocab_size", vocab_size, 0, 1 << 24)
        if isinstance(tree_budget, str) and tree_budget.strip().lower() != "auto":
            try:
                tree_budget = int(tree_budget)
            except ValueError:
                raise ValueError(f"tree_budget must be 'auto' or an integer >= 0, got {tree_budget!r}") from None
        if not isinstance(tree_budget, str):
            _check_int("tree_budget", tree_budget, 0, 1 << 16)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
        if latency_curve is not None and not isinstance(latency_curve, LatencyCurve):
            raise ValueError(f"latency_curve must be a LatencyCurve or None, got {type(latency_curve).__name__}")
        if template is None:
            paths = best_first_template(DEFAULT_RANK_ACCEPTANCE[:top_k], DEFAULT_TEMPLATE_NODES,
                                        DEFAULT_TEMPLATE_DEPTH)
        elif isinstance(template, str):
            paths = parse_template(template)
        else:
            paths = list(template)
        self.top_k = top_k
        self.update = update
        self.template = TreeTemplate(paths, top_k)
        self.table = RecyclingTable(top_k, vocab_size or None)
        if table_path and not is_auto(table_path):
            self.table.load(table_path)
        self.auto = isinstance(tree_budget, str)
        self.latency_curve = latency_curve
        self.tree_budget = len(self.template) if self.auto else min(tree_budget, len(self.template))
        self._steps_since_choice = 0
        self._selected: list[int] = []  # template nodes selected for the last draft
        self._origin: list[int] = []  # template index of each node of the last draft
        self._last_draft: Draft | None = None
        if self.auto and latency_curve is not None:
            self.choose_budget()

    @classmethod
    def from_options(cls, kwargs: dict[str, Any], target: Any = None, **context: Any) -> TokenRecycling:
        """Registry entry: with tree_budget "auto" and a loaded target, measure (or read the cached) latency curve
        of the target on its device, so the tree size fits this hardware; table_path "auto" becomes the table
        shipped for the target, if any."""
        return cls(**target_options(kwargs, target))

    # -------------------------------------------------------------------------------------------- protocol

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> None:
        """New request: only per-request state is dropped; the table and the acceptance counts are kept."""
        self._origin = []
        self._last_draft = None

    def fork(self) -> TokenRecycling:
        """A drafter for another request running at the same time (the server's share_drafter_state): it shares
        the table and the template's acceptance counts and has its own step state. Output stays exact whatever the
        table holds; only the drafts depend on what other requests taught it."""
        other = copy.copy(self)
        other._selected, other._origin, other._last_draft = [], [], None
        # re-choose the tree size from the shared counts at its first step (on the thread that runs it: fork may
        # run elsewhere, and choosing fills the shared template's caches)
        other._steps_since_choice = RECHOOSE_EVERY
        return other

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self._selected = self.template.select(min(budget, self.tree_budget))
        tokens, parents, origin = self.table.expand(int(context[-1]), self.template, self._selected)
        self._origin = origin
        draft = Draft.tree(tokens, parents) if tokens else Draft.empty()
        self._last_draft = draft
        return draft

    def observe(self, step: StepResult) -> None:
        self.learn(step)
        if step.draft is self._last_draft and self._origin:
            self.record(self._selected, [self._origin[node] for node in step.path])

    # ------------------------------------------------------------------------------------ parts (for hybrid)

    def learn(self, step: StepResult) -> None:
        """Overwrite the rows of the root and of every verified node with the target's top-k there. The root and
        the accepted path are written last, so when a token sits at several nodes its row comes from the real
        context rather than from a rejected branch (update="path": rejected nodes only fill empty rows)."""
        n = step.draft.n
        on_path = set(step.path)
        draft_tokens = step.draft.tokens.tolist()
        rejected = [i for i in range(n) if i not in on_path]
        if self.update == "path" and self.table.table is not None:  # rejected nodes may only fill empty rows
            rejected = [i for i in rejected if self.table.table[draft_tokens[i], 0] < 0]
        order = [i + 1 for i in rejected] + [0] + [i + 1 for i in step.path]  # logits rows; row 0 = the root
        self.table.update([step.root] + draft_tokens, step.logits[: n + 1], order)  # [n + 1, vocab] view

    def record(self, selected: Sequence[int], accepted: Sequence[int]) -> None:
        """Count a step that selected these template nodes, of which `accepted` were on the accepted path;
        re-choose the budget now and then."""
        self.template.record(selected, accepted)
        self._steps_since_choice += 1
        if self.auto and self.latency_curve is not None and self._steps_since_choice >= RECHOOSE_EVERY:
            self.choose_budget()

    def choose_budget(self) -> int:
        """Set tree_budget to the template size that maximises expected tokens per second on the latency curve."""
        expected = self.template.expected_tokens()  # [T + 1]
        top = min(len(self.template), self.latency_curve.max_size)
        self.tree_budget = choose_budget(self.latency_curve, lambda b: float(expected[b]), top)
        self._steps_since_choice = 0
        return self.tree_budget

    # ------------------------------------------------------------------------------------------ state

    def save(self, path: str | Path) -> None:
        """Save the table (int32 [vocab, k] and the vocab size) for a warm start in another process."""
        self.table.save(path)

    def load(self, path: str | Path) -> None:
        self.table.load(path)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tree_budget": self.tree_budget, "template_nodes": len(self.template),
                               "table_rows": self.table.filled_rows(), "table_bytes": self.state_bytes()}
        if self.latency_curve is not None:
            out["latency_curve_ms"] = self.latency_curve.as_ms()
        return out

    def state_bytes(self) -> int:
        """Memory of the table (vocab x k int32) plus the template's per-node counters."""
        table = 0 if self.table.table is None else int(self.table.table.nbytes)
        return table + int(self.template.hits.nbytes + self.template.prior.nbytes)
