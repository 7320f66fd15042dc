"""Attention on the CPU for every sequence of a step in one call per layer (attend.c).

torch's attention runs one sequence per call: in a server step of 16 one-row sequences SmolLM2-135M made 480 small
SDPA calls (30 layers x 16), each with its own reshapes and cache write, and they cost more than the weights'
products (BENCHMARKS.md section 0d: a 16 x 1-row step 226.1 ms against 100.9 for 16 rows of one sequence). attend.c
takes a layer's rows of all sequences at once: it writes each row's key and value into its sequence's cache and
attends every (row, query head) over that sequence's visible slots, spread over the OpenMP threads.

Each output is summed in one fixed order from its own row, cache and mask row alone (attend.c says how), so a
sequence gets the same bits whichever sequences share its step, and a tree node gets the bits the same token gets
when decoded alone after its path was committed: with the skinny products, a verify step and a plain step compute
a token's logits identically.

Used for float32 CPU steps whose segments have at most MAX_ROWS rows each (decode and verify) and head sizes that
are multiples of 8; prefill chunks keep torch's SDPA, which runs the many-row case as matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leapdecode.models.fast import kernels

MAX_ROWS = 64  # rows per sequence; above this (prefill) torch's SDPA is faster


def usable(x: torch.Tensor, head_dim: int, rows: Sequence[int]) -> bool:
    """Whether a step with activations `x` and these rows per sequence can run on the kernel."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and head_dim % 8 == 0 \
        and max(rows, default=0) <= MAX_ROWS and kernels.unavailable_reason() is None


@dataclass(frozen=True)
class Step:
    """What every layer of one step passes to the kernel: segments [S, 5] (first row, rows, start slot, mask row
    stride, cache capacity), cache addresses [S] and, per attention window, mask addresses [S]."""

    segments: torch.Tensor
    caches: torch.Tensor
    masks: dict[int | None, torch.Tensor]
    keep: tuple[torch.Tensor, ...]  # the caches and masks those addresses point into


def step(firsts: Sequence[int], rows: Sequence[int], starts: Sequence[int], caches: Sequence[torch.Tensor],
         masks: Sequence[dict[int | None, torch.Tensor]]) -> Step:
    """caches: each sequence's kv [layers, capacity, 2, kv_heads, head_dim] (contiguous float32); masks: per
    sequence and window, a bool [rows, length] (row r sees slot s)."""
    windows = list(masks[0]) if masks else []
    masks = [{w: m[w].contiguous() for w in windows} for m in masks]
    table = [[f, r, s, m[windows[0]].shape[1] if windows else 0, c.shape[1]]
             for f, r, s, m, c in zip(firsts, rows, starts, masks, caches)]
    for c in caches:
        if not c.is_contiguous() or c.dtype != torch.float32:
            raise ValueError("attend needs contiguous float32 caches")
    return Step(torch.tensor(table, dtype=torch.int64).reshape(-1, 5),
                torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64),
                {w: torch.tensor([m[w].data_ptr() for m in masks], dtype=torch.int64) for w in windows},
                tuple(caches) + tuple(m[w] for m in masks for w in windows))


def attend(qkv: torch.Tensor, plan: Step, layer: int, window: int | None, heads: int, kv_heads: int,
           scale: float) -> torch.Tensor:
    """qkv [R, heads + 2 kv_heads, d] (rotated) of all sequences -> attention output [R, heads * d]; writes the
    rows' keys and values into the caches first."""
    rows, _, d = qkv.shape
    qkv = qkv.contiguous()
    out = torch.empty(rows, heads * d, dtype=torch.float32)  # [R, heads * d]
    kernels.library().leap_attend(qkv.data_ptr(), out.data_ptr(), heads, kv_heads, d, scale,
                                  plan.segments.shape[0], plan.segments.data_ptr(), plan.caches.data_ptr(),
                                  plan.masks[window].data_ptr(), layer, torch.get_num_threads())
    return out


def self_check(lib) -> str | None:
    """Two sequences (a tree step after a prefix, one row after a longer prefix) against softmax in float64."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, scale = 4, 2, 16, 0.25
    lengths, rows = (5, 11), (3, 1)
    caches = [torch.randn(1, 16, 2, kv_heads, d, generator=gen) for _ in rows]
    qkv = torch.randn(sum(rows), heads + 2 * kv_heads, d, generator=gen)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    masks = []
    for n, r in zip(lengths, rows):
        m = torch.zeros(r, 16, dtype=torch.bool)
        m[:, :n] = True
        m[:, n: n + r] = tree[:r, :r]
        masks.append({None: m})
    plan = step([0, 3], rows, lengths, caches, masks)
    out = torch.empty(sum(rows), heads * d)
    lib.leap_attend(qkv.data_ptr(), out.data_ptr(), heads, kv_heads, d, scale, 2, plan.segments.data_ptr(),
                    plan.caches.data_ptr(), plan.masks[None].data_ptr(), 0, 2)
    first = 0
    for cache, n, r, m in zip(caches, lengths, rows, masks):
        keys, values = cache[0, : n + r, 0].double(), cache[0, : n + r, 1].double()  # [slots, kv, d]
        if not torch.equal(cache[0, n: n + r].reshape(r, -1), qkv[first: first + r, heads:].reshape(r, -1)):
            return "the attention kernel did not store the rows' keys and values"
        for i in range(r):
            for h in range(heads):
                q = qkv[first + i, h].double()
                scores = keys[:, h // (heads // kv_heads)] @ q * scale
                scores[~m[None][i, : n + r]] = float("-inf")
                want = torch.softmax(scores, 0) @ values[:, h // (heads // kv_heads)]
                if not torch.allclose(out[first + i, h * d: (h + 1) * d].double(), want, rtol=1e-4, atol=1e-5):
                    return "the built attention kernel disagrees with torch"
        first += r
    return None
