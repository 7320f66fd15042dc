"""Statistics for the sampling-exactness tests: empirical laws of token sequences, total-variation distance, and
distance bounds that hold with high probability when the samples really come from the claimed law.

Why these bounds (no scipy needed):
- Let P be a law on K outcomes and P_N the empirical law of N independent draws from P. Each count is binomial, so
  E|P_N(i) - P(i)| <= sqrt(P(i)(1 - P(i)) / N) (Jensen), hence E[TV(P_N, P)] <= 1/2 * sum_i sqrt(P(i)(1 - P(i)) / N).
- TV(P_N, P) moves by at most 1/N when one draw changes, so McDiarmid's inequality gives
  Pr[TV >= E[TV] + t] <= exp(-2 N t^2): with t = sqrt(ln(1/delta) / (2N)) a correct sampler exceeds the bound with
  probability at most delta.
- Two samples (N draws and M draws, both from P): TV(P_N, Q_M) <= TV(P_N, P) + TV(Q_M, P), and one draw moves it by at
  most 1/N (resp. 1/M), so the deviation term becomes sqrt(ln(1/delta) * (1/N + 1/M) / 2).
The bounds are rigorous, not asymptotic, so a failure means the sampler is wrong (or a 1-in-1/delta accident).
A wrong sampler whose law sits at TV distance d from P fails as soon as d exceeds the bound, which shrinks like
1/sqrt(N): the tests check that their wrong-rule controls do fail.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

DELTA = 1e-6  # false-alarm probability of each bound for a correct sampler


def sequence_index(seqs: np.ndarray, vocab: int) -> np.ndarray:
    """Index of each token sequence in the lexicographic order of vocab**L sequences: [N, L] -> [N]."""
    seqs = np.asarray(seqs, dtype=np.int64)  # [N, L]
    if seqs.ndim != 2 or (seqs < 0).any() or (seqs >= vocab).any():
        raise ValueError(f"sequences must be an [N, L] array of tokens in [0, {vocab}), got shape {seqs.shape}")
    weights = vocab ** np.arange(seqs.shape[1] - 1, -1, -1, dtype=np.int64)  # [L], most significant token first
    return seqs @ weights


def empirical_law(samples: Sequence[Sequence[int]] | np.ndarray, vocab: int) -> np.ndarray:
    """Empirical law [vocab**L] of N token sequences of equal length L (lexicographic order)."""
    seqs = np.asarray(samples, dtype=np.int64)  # [N, L]
    length = seqs.shape[1]
    counts = np.bincount(sequence_index(seqs, vocab), minlength=vocab**length)  # [vocab**L]
    return counts / len(seqs)


def exact_sequence_law(next_law: Callable[[tuple[int, ...]], np.ndarray], vocab: int, length: int) -> np.ndarray:
    """Exact law [vocab**length] of the first `length` tokens of an autoregressive model.

    `next_law(prefix)` returns the distribution [vocab] of the next token after `prefix` (a tuple of tokens).
    Sequences are listed in the same lexicographic order as `empirical_law`.
    """
    law = np.empty(vocab**length)
    for i, seq in enumerate(itertools.product(range(vocab), repeat=length)):
        prob = 1.0
        for t in range(length):
            prob *= float(next_law(seq[:t])[seq[t]])
            if prob == 0.0:
                break
        law[i] = prob
    return law


def marginal(law: np.ndarray, vocab: int, length: int, keep: Sequence[int]) -> np.ndarray:
    """Marginal law of the positions `keep` of a law over vocab**length sequences (flattened, lexicographic)."""
    drop = tuple(t for t in range(length) if t not in keep)
    return law.reshape((vocab,) * length).sum(axis=drop).reshape(-1)


def tv_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between two laws on the same outcomes: 1/2 * sum |a - b|."""
    return 0.5 * float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).sum())


def _mean_tv_bound(law: np.ndarray, n: int) -> float:
    law = np.clip(np.asarray(law, dtype=np.float64), 0.0, 1.0)  # float rounding can leave 1 + 1e-16
    return 0.5 * float(np.sqrt(law * (1.0 - law)).sum()) / math.sqrt(n)


def tv_bound(law: np.ndarray, n: int, delta: float = DELTA) -> float:
    """TV(empirical law of n draws from `law`, `law`) stays below this with probability >= 1 - delta."""
    return _mean_tv_bound(law, n) + math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def tv_bound_two_sample(law: np.ndarray, n: int, m: int, delta: float = DELTA) -> float:
    """TV(empirical of n draws, empirical of m draws), both from `law`, stays below this w.p. >= 1 - delta."""
    return (_mean_tv_bound(law, n) + _mean_tv_bound(law, m)
            + math.sqrt(math.log(1.0 / delta) * (1.0 / n + 1.0 / m) / 2.0))
