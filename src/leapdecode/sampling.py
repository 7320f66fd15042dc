"""Sampling configuration and logits warping (temperature, top-k, top-p).

The warped distribution *is* the target distribution p that exact acceptance preserves: speculative sampling with
a given SamplingConfig produces samples from exactly `warp(logits, config)` at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples from the warped distribution
    top_k: int = 0  # 0 = off; otherwise keep the k most likely tokens
    top_p: float = 1.0  # 1.0 = off; otherwise keep the smallest set whose mass reaches top_p
    seed: int | None = None  # seeds the request's torch.Generator; None draws a fresh seed

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Turn raw logits [..., vocab] into the target distribution p [..., vocab] (float32, rows sum to 1).

    For greedy configs this is the one-hot of the argmax, so the same exact rules serve both modes.
    """
    logits = logits.float()
    if config.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., vocab]
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token is always kept)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request-owned generator: the same seed reproduces the same run."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token from a distribution [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The index of each row's largest value, the first one on ties (as torch's argmax) for logits [r, vocab]. On a
    CPU through numpy, whose argmax over a vocabulary-wide row was much faster than torch's on the development
    machine; the greedy rule pays it for every row of every step."""
    if logits.device.type == "cpu":
        return logits.float().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def top_k_rows(logits: torch.Tensor, k: int) -> np.ndarray:
    """The indices of each row's k largest values, largest first, distinct, for logits [r, vocab] -> int64 [r, k].

    On a CPU through numpy, because torch.topk over a few vocabulary-wide rows was most of what recycling's table
    update cost in a profile of the server (it writes a table row from every verified node of every step): the
    k-th largest of 64 chunk maxima is a threshold that at least k values of the row reach, and only those are
    sorted (by value, then index). Elsewhere, for other dtypes, for a k that is not small against the row, or for
    rows holding NaN, torch.topk."""
    rows, vocab = logits.shape
    chunks = 64
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or not 0 < k <= chunks // 4 or vocab < chunks:
        return torch.topk(logits, min(k, vocab), dim=-1).indices.cpu().numpy()
    x = logits.detach().numpy()  # [r, vocab]
    step = -(-vocab // chunks)
    maxima = np.maximum.reduceat(x, np.arange(0, vocab, step), axis=1)  # [r, C]
    if np.isnan(maxima).any():
        return torch.topk(logits, k, dim=-1).indices.numpy()
    C = maxima.shape[1]
    threshold = np.partition(maxima, C - k, axis=1)[:, C - k]  # [r]: k distinct values of the row reach it
    out = np.empty((rows, k), dtype=np.int64)
    for i in range(rows):
        candidates = np.flatnonzero(x[i] >= threshold[i])  # [c >= k], ascending
        out[i] = candidates[np.lexsort((candidates, -x[i, candidates]))[:k]]
    return out
