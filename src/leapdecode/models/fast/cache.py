"""A position-indexed static KV cache: one preallocated tensor for every layer, slots addressed by index.

Layout: kv [layers, capacity, 2, kv_heads, head_dim] (slot-major, k then v), so that
- a step writes the keys and values of all its rows in one index_copy per layer (rows land at consecutive slots
  start .. start + rows - 1, whatever their tree positions are);
- committing a tree path gathers the accepted nodes of *all layers* into consecutive slots with one index_select and
  one copy: rejected slots are never cleared, they are simply beyond the committed length and get overwritten by a
  later step;
- attention reads slots [0, length) of a layer as strided views, no copy.

Invariant kept by the runner: committed slot s holds the token at position s (prefill writes consecutive positions,
commit compacts the root and the accepted path into consecutive slots).
"""

from __future__ import annotations

import torch


class StaticCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, max_capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if capacity < 1 or max_capacity < capacity:
            raise ValueError(f"capacity must satisfy 1 <= capacity <= max_capacity, got {capacity}, {max_capacity}")
        self.max_capacity = max_capacity
        self.kv = torch.zeros(n_layers, capacity, 2, n_kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.kv.shape[1]

    def ensure(self, slots: int) -> bool:
        """Make room for `slots` slots (doubling, up to max_capacity). True when the tensor was reallocated, which
        moves it: anything that captured its address (CUDA graphs) must be rebuilt."""
        if slots <= self.capacity:
            return False
        if slots > self.max_capacity:
            raise ValueError(f"the KV cache would need {slots} slots, beyond the model's {self.max_capacity} positions")
        capacity = self.capacity
        while capacity < slots:
            capacity *= 2
        capacity = min(capacity, self.max_capacity)
        grown = torch.zeros((self.kv.shape[0], capacity) + self.kv.shape[2:], dtype=self.kv.dtype,
                            device=self.kv.device)
        grown[:, : self.capacity] = self.kv
        self.kv = grown
        return True

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]  # [capacity, 2, kv_heads, head_dim]

    def gather(self, start: int, source: torch.Tensor) -> None:
        """Move the slots `source` [k] (accepted nodes, in path order) to slots start + 1 .. start + k, for every
        layer at once; the root at slot `start` stays. The index_select copies before the write, so overlapping
        source and destination slots are safe."""
        k = source.numel()
        self.kv[:, start + 1: start + 1 + k] = self.kv.index_select(1, source)  # [layers, k, 2, kv_heads, head_dim]
