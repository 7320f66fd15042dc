"""How often a copy chain is right: per match length n and depth d, learned while decoding, started from a prior.

A copy chain (prompt lookup: what followed the most recent earlier occurrence of the context's longest suffix that
occurred before, up to max_ngram tokens) is right for d tokens with a probability that depends mostly on the
length n of the matched suffix. ChainStats keeps that probability for the hybrid drafter, which sizes its chain by
it and hands it to the server's scheduler, which drafts a sequence of a wide batch only where a node's chance
beats the price of its row.

A request's own evidence is little (a 128-token answer has a dozen steps with a 4-token match), so where the
estimates start matters. The built-in prior is one guess per n, the same at every depth (CHAIN_PRIOR). A better
one is measured: `chain_counts` runs the lookup over the target's own answers to prompts (leapdecode's distill
prompts, none from a benchmark) and counts, per n and d, how often the chain was right, exactly as ChainStats
counts while decoding. `write_chain_counts` stores them as chains.json beside the shipped recycling table
(leapdecode.drafters.shipped); `chain_prior` turns them into per-depth prior rates.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leapdecode.drafters.pld import continuation, find_match

# prior P(chain node d is right | node d - 1 was right) for a match of length n = 1, 2, 3, 4+ (before any evidence)
CHAIN_PRIOR = (0.3, 0.45, 0.6, 0.7)
PRIOR_STEPS = 16.0  # weight of the prior rates against the counts, in observations (as recycling's template prior)
RECENT_PRIOR = 4.0  # weight of the long-run rate against a request's recent chain evidence, in observations
MAX_RATE = 0.98  # a chain node is never taken for certain
COUNTS_FORMAT = "leapdecode-chain-counts-1"


def agreement(chain: Sequence[int], emitted: Sequence[int]) -> int:
    """How many leading tokens of `chain` equal the emitted (or true) tokens that follow."""
    agree = 0
    while agree < len(chain) and agree < len(emitted) and chain[agree] == emitted[agree]:
        agree += 1
    return agree


def flat_prior(max_ngram: int, max_chain: int) -> np.ndarray:
    """[max_ngram + 1, max_chain] the built-in prior rates: CHAIN_PRIOR per n at every depth (row 0 unused)."""
    per_n = [CHAIN_PRIOR[min(n, len(CHAIN_PRIOR)) - 1] if n else 0.0 for n in range(max_ngram + 1)]
    return np.repeat(np.array(per_n)[:, None], max_chain, axis=1)


class ChainStats:
    """P(the first d tokens of a copy chain are right), per match length n, as a product of per-depth survival
    rates: rate(n, d) = P(token d right | tokens < d right). Each step is evidence for the depths it tried: every
    depth up to the first disagreement between the chain and the emitted tokens, that one included (a depth past
    it says nothing about the conditional rate there); when the chain agreed with all the emitted tokens, the
    depths beyond are unknown and not counted (censored), which keeps the rates unbiased. Each rate starts from
    `prior` [max_ngram + 1, max_chain] (default flat_prior; a measured one: chain_prior), worth PRIOR_STEPS
    observations.

    Copying comes in spells: an answer that quotes its prompt copies for many steps in a row, then writes fresh text.
    So the rates also follow the current request: with `memory` > 0, the request's recent chain evidence (any n and
    depth, counts decayed by `memory` per step: ~1 / (1 - memory) steps remembered) is pooled with the long-run
    rate, which acts as a prior worth RECENT_PRIOR observations. memory = 0 uses the long-run rates alone."""

    def __init__(self, max_ngram: int, max_chain: int, memory: float = 0.0, prior: np.ndarray | None = None) -> None:
        self.max_chain = max_chain
        self.memory = memory
        self.at_risk = np.zeros((max_ngram + 1, max_chain))  # [n, d] steps whose outcome at depth d + 1 is known
        self.survived = np.zeros((max_ngram + 1, max_chain))  # [n, d] of those, chain right up to depth d + 1
        self.recent_at_risk = self.recent_survived = 0.0  # this request's decayed counts over all n and depths
        if prior is None:
            prior = flat_prior(max_ngram, max_chain)
        if prior.shape != self.at_risk.shape:
            raise ValueError(f"chain prior must be [{max_ngram + 1}, {max_chain}], got {tuple(prior.shape)}")
        self._prior = prior  # [n, d]
        self._clock = [0]  # evidence recorded so far, shared with forks (their cached probs expire with it)
        self._probs: np.ndarray | None = None
        self._probs_at = -1  # the clock when _probs was computed (-1: never, or the recent evidence changed)

    def fork(self) -> ChainStats:
        """Statistics for another request: the long-run counts are shared (updated in place), the recent ones are
        its own."""
        other = copy.copy(self)
        other.recent_at_risk = other.recent_survived = 0.0
        other._probs_at = -1
        return other

    def probs(self, n: int) -> np.ndarray:
        """[max_chain] P(chain node d + 1 is accepted) for a match of length n, non-increasing in d."""
        if self._probs_at != self._clock[0]:
            self._probs_at = self._clock[0]
            rates = (self.survived + PRIOR_STEPS * self._prior) / (self.at_risk + PRIOR_STEPS)  # [n, d]
            if self.memory > 0.0:
                rates = (self.recent_survived + RECENT_PRIOR * rates) / (self.recent_at_risk + RECENT_PRIOR)
            self._probs = np.cumprod(np.minimum(rates, MAX_RATE), axis=1)  # [n, d]
        return self._probs[n]

    def record(self, n: int, chain: Sequence[int], emitted: Sequence[int]) -> None:
        agree = agreement(chain, emitted)
        # depths tried: up to the first wrong one; when the chain agreed with every emitted token, no further
        tried = min(len(chain), agree + 1) if agree < len(emitted) else agree
        self.at_risk[n, :tried] += 1
        self.survived[n, :agree] += 1
        if self.memory > 0.0:
            self.recent_at_risk = self.memory * self.recent_at_risk + tried
            self.recent_survived = self.memory * self.recent_survived + agree
        self._clock[0] += 1

    def new_request(self) -> None:
        """Forget the recent evidence (a new request); the long-run rates stay."""
        self.recent_at_risk = self.recent_survived = 0.0
        self._probs_at = -1


def chain_counts(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], max_ngram: int = 4,
                 max_chain: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(at_risk, survived), each [max_ngram + 1, max_chain], counted over greedy answers: for every (prompt ids,
    answer ids) pair and every answer position, the chain the lookup finds in prompt + answer so far (matches of 1
    to max_ngram tokens) against the answer's next tokens, as ChainStats.record counts a decoding step whose
    emitted tokens are those. The answer's end censors the depths past it."""
    stats = ChainStats(max_ngram, max_chain)
    for prompt, answer in pairs:
        buf = np.asarray(list(prompt) + list(answer), dtype=np.int64)  # [P + A]
        start = len(prompt)
        for t in range(start, buf.shape[0]):
            n, end = find_match(buf[:t], max_ngram, 1)  # the context before answer token t - start
            if n:
                stats.record(n, continuation(buf[:t], end, max_chain).tolist(), buf[t: t + max_chain + 1].tolist())
    return stats.at_risk, stats.survived


def write_chain_counts(path: str | Path, at_risk: np.ndarray, survived: np.ndarray, source: str) -> None:
    """Store counts from chain_counts as JSON (what they were counted on in `source`, in words)."""
    if at_risk.shape != survived.shape or at_risk.ndim != 2 or (survived > at_risk).any():
        raise ValueError("chain counts need at_risk and survived of one shape [n, d] with survived <= at_risk")
    Path(path).write_text(json.dumps({"format": COUNTS_FORMAT, "source": source,
                                      "at_risk": at_risk.astype(int).tolist(),
                                      "survived": survived.astype(int).tolist()}) + "\n")


def read_chain_counts(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(at_risk, survived) [n, d] from a file written by write_chain_counts, checked."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a chain counts file ({COUNTS_FORMAT}): {exc}") from None
    if not isinstance(data, dict) or data.get("format") != COUNTS_FORMAT or "at_risk" not in data \
            or "survived" not in data:
        raise ValueError(f"{path} is not a chain counts file: it needs format {COUNTS_FORMAT!r}, at_risk and "
                         f"survived (leapdecode distill-tables or scripts/chain_counts.py write one)")
    try:
        at_risk, survived = np.array(data["at_risk"], dtype=float), np.array(data["survived"], dtype=float)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: at_risk and survived must be tables of numbers ({exc})") from None
    if at_risk.ndim != 2 or at_risk.shape != survived.shape or at_risk.shape[0] < 2 or at_risk.shape[1] < 1 \
            or (survived < 0).any() or (survived > at_risk).any():
        raise ValueError(f"{path} is not a valid chain counts file ({COUNTS_FORMAT}: at_risk and survived [n, d], "
                         f"0 <= survived <= at_risk)")
    return at_risk, survived


def chain_prior(at_risk: np.ndarray, survived: np.ndarray, max_ngram: int, max_chain: int) -> np.ndarray:
    """[max_ngram + 1, max_chain] prior rates from measured counts, each smoothed towards flat_prior by
    PRIOR_STEPS observations (a depth seldom reached keeps about the built-in guess). A match longer than the
    counts' longest n takes that n's rates; a depth past the counts' deepest takes the deepest one's."""
    flat = flat_prior(max_ngram, max_chain)
    rows = np.minimum(np.arange(max_ngram + 1), at_risk.shape[0] - 1)  # [n] the counted n each n reads
    cols = np.minimum(np.arange(max_chain), at_risk.shape[1] - 1)  # [d] the counted depth each d reads
    a, s = at_risk[np.ix_(rows, cols)], survived[np.ix_(rows, cols)]  # [n, d]
    prior = (s + PRIOR_STEPS * flat) / (a + PRIOR_STEPS)
    prior[0] = 0.0  # no match: no chain
    return prior


def load_chain_prior(path: str | Path, max_ngram: int, max_chain: int) -> np.ndarray:
    """chain_prior of the counts in `path`, read and checked once per file version and shape (a server builds a
    drafter per request). Read-only: every ChainStats built from it shares it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"chain counts file {str(path)!r} does not exist (chain_prior takes 'auto', '' or the path "
                         f"of a chains.json written by leapdecode distill-tables)")
    stat = path.stat()
    return _load_chain_prior(str(path.resolve()), stat.st_size, stat.st_mtime_ns, max_ngram, max_chain)


@functools.lru_cache(maxsize=8)
def _load_chain_prior(path: str, size: int, mtime_ns: int, max_ngram: int, max_chain: int) -> np.ndarray:
    """load_chain_prior's cached part: size and mtime_ns are in the key so that a rewritten file is read again."""
    prior = chain_prior(*read_chain_counts(path), max_ngram, max_chain)
    prior.flags.writeable = False
    return prior


@dataclass(frozen=True)
class ChainWalk:
    """What decoding greedy answers with copy chains alone came to when each drafted row costs `price` of a plain
    token (chain_walk). A plain step emits one token for one row's share of a step; a drafted row adds `price`."""

    price: float
    steps: int  # decoding steps (each emits its accepted tokens and one more)
    tokens: int  # answer tokens emitted
    rows: int  # drafted chain nodes verified
    accepted: int  # of those, accepted
    drafted: int  # steps that drafted at least one node

    @property
    def speedup(self) -> float:
        """Tokens per unit of time against plain decoding (one unit per token): tokens / (steps + price x rows)."""
        return self.tokens / (self.steps + self.price * self.rows) if self.tokens else 1.0


def chain_walk(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], probs: np.ndarray, price: float,
               oracle: bool = False, max_ngram: int = 4, max_chain: int = 32) -> ChainWalk:
    """Decode each (prompt ids, greedy answer ids) pair step by step with the prompt-lookup chain as the only
    draft, its length chosen per step with the chain's acceptance chances `probs` [max_ngram + 1, max_chain]
    (P(first d + 1 nodes right) for match length n, e.g. cumprod of chain_prior) by the rule of the server's
    scheduler for one sequence: the k that maximises (1 + expected accepted) / (1 + price x k). The chances stay
    fixed (a server's hybrid also learns from each request's own steps). With `oracle`, k is instead exactly the
    number of chain tokens that are right (none at a price of 1 or more, where a right token costs what it
    brings): more than any estimate of these chains can gain per step at that price. Drafters' own time is not
    counted. A step drafts at most up to the answer's second-to-last token, so its bonus token is still in the
    answer."""
    if price < 0:
        raise ValueError(f"price must be >= 0, got {price}")
    if probs.ndim != 2 or probs.shape[0] < max_ngram + 1 or probs.shape[1] < max_chain:
        raise ValueError(f"probs must be [>= {max_ngram + 1}, >= {max_chain}] (match length, depth), got "
                         f"{tuple(probs.shape)}")
    steps = tokens = rows = accepted = drafted = 0
    for prompt, answer in pairs:
        buf = np.asarray(list(prompt) + list(answer), dtype=np.int64)  # [P + A]
        t, end_of_answer = len(prompt), buf.shape[0]
        while t < end_of_answer:
            left = end_of_answer - t  # tokens this and later steps emit
            n, end = find_match(buf[:t], max_ngram, 1)
            k = right = 0
            if n:
                chain = continuation(buf[:t], end, min(max_chain, left - 1))  # [<= left - 1]
                right = agreement(chain.tolist(), buf[t: t + chain.shape[0]].tolist())  # leading tokens right
                if oracle:
                    k = right if price < 1.0 else 0
                elif chain.shape[0]:
                    gains = 1.0 + np.concatenate([[0.0], np.cumsum(probs[n][: chain.shape[0]])])  # [c + 1]
                    k = int(np.argmax(gains / (1.0 + price * np.arange(gains.shape[0]))))
            took = min(right, k)
            steps, rows, accepted, tokens = steps + 1, rows + k, accepted + took, tokens + 1 + took
            drafted += k > 0
            t += 1 + took
    return ChainWalk(price, steps, tokens, rows, accepted, drafted)
