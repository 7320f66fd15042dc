"""FastRunner: the target runner with its own forward, a static position-indexed KV cache and CUDA graph replay.

It honours the TargetRunner contract of models/base.py exactly as HFRunner does (the cache holds every committed
token but the root; verify scores the root, the draft nodes and an optional aux branch in one pass; commit keeps the
root and the accepted path), so the decode loop cannot tell them apart except by speed.

A step of r rows writes slots start .. start + r - 1 (start = committed length): slot order is row order, while a
row's *position* is start + its depth in the tree. commit() gathers the accepted nodes into consecutive slots for
all layers at once; rejected slots are left behind and overwritten by the next step.

On CUDA each step replays a captured graph (graphs.py); on the CPU, or with graphs off, the same forward runs
eagerly with exactly r rows. Prefill always runs eagerly, in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from leapdecode.drafters.base import Draft
from leapdecode.models.fast.cache import StaticCache
from leapdecode.models.fast.forward import forward
from leapdecode.models.fast.graphs import StepGraphs, pow2, row_bucket
from leapdecode.models.fast.weights import add_cpu_layouts, extract


@dataclass(frozen=True)
class FastConfig:
    """graphs: capture and replay CUDA graphs (None = on for CUDA devices; needs CUDA).
    capacity: initial KV slots (None = 4096 on CUDA, 512 elsewhere, at most the model's positions); the cache doubles
        when a request needs more.
    max_graph_rows: largest padded step replayed from a graph (a row bucket: 1, 2, 4, 8, 16 or a multiple of 16);
        bigger steps run eagerly.
    min_rows: pad every step to at least this many rows. Steps of one padded size share one set of kernels, so
        their logits for the same token are bit-identical; with min_rows >= the largest draft + 1, speculative and
        plain greedy decoding give the same tokens even in bf16, at the price of a wider plain step.
    min_length: smallest number of slots attention scans (None = 256 on CUDA, 64 elsewhere); lengths are powers of
        two from there, so a step scans at most twice its context.
    prefill_chunk: rows per eager prefill forward (bounds the mask's memory).
    timing: record CUDA events around every step so that gpu_seconds() can say how long the GPU worked.
    cpu_layouts: keep every projection also in the layouts the CPU reads fastest (None = on for CPU devices): the
        skinny kernel on the weights as stored for steps of up to 64 rows and a oneDNN-packed copy for more (where
        the kernel does not build: a transposed copy for one-row steps and the packed one for several), see
        models/fast/cpu.py and skinny.py.
    cpu_kernel: with cpu_layouts, use the skinny kernel where it builds (False: torch's products only).
    cpu_attention: with cpu_layouts, attend through attend.c in decode and verify steps where it builds: one call
        per layer for every sequence of a step, each output summed in a fixed order (False: torch's SDPA).
    """

    graphs: bool | None = None
    capacity: int | None = None
    max_graph_rows: int = 128
    min_rows: int = 1
    min_length: int | None = None
    prefill_chunk: int = 512
    timing: bool = False
    cpu_layouts: bool | None = None
    cpu_kernel: bool = True
    cpu_attention: bool = True

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 KV slots, got {self.capacity}")
        if self.max_graph_rows < 1 or row_bucket(self.max_graph_rows) != self.max_graph_rows:
            raise ValueError(f"max_graph_rows must be 1, 2, 4, 8, 16 or a multiple of 16, got {self.max_graph_rows}")
        if not 1 <= self.min_rows <= self.max_graph_rows:
            raise ValueError(f"min_rows must be in [1, max_graph_rows={self.max_graph_rows}], got {self.min_rows}")
        if self.min_length is not None and (self.min_length < 1 or pow2(self.min_length) != self.min_length):
            raise ValueError(f"min_length must be a power of two >= 1, got {self.min_length}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


class FastRunner:
    supports_trees = True
    supports_aux = True  # scores Draft's auxiliary branch (more rows with their own mask) in the same pass

    def __init__(self, hf_model: Any, config: FastConfig | None = None) -> None:
        self.config = config = config or FastConfig()
        self.spec, self.weights = extract(hf_model)
        self.device = self.weights.embed.device
        self.dtype = self.weights.embed.dtype
        self.vocab_size = self.spec.vocab_size
        cuda = self.device.type == "cuda"
        if config.cpu_layouts if config.cpu_layouts is not None else self.device.type == "cpu":
            add_cpu_layouts(self.weights, config.cpu_kernel, config.cpu_attention)
        use_graphs = cuda if config.graphs is None else config.graphs
        if use_graphs and not cuda:
            raise ValueError(f"graphs=True needs a CUDA device; the model is on {self.device}")
        max_slots = self.spec.max_positions
        capacity = min(max_slots, config.capacity or (4096 if cuda else 512))
        self.cache = StaticCache(self.spec.n_layers, self.spec.n_kv_heads, self.spec.head_dim, capacity, max_slots,
                                 self.dtype, self.device)
        self.min_length = config.min_length or (256 if cuda else 64)
        self.graphs = StepGraphs(self._step_forward, self.device, config.max_graph_rows) if use_graphs else None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.reset()

    # ------------------------------------------------------------------------------------------------ protocol

    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        self._cache_len = 0  # committed tokens in the cache (the root is not among them); older slots are stale
        self._verified = 0  # rows written by the last verify, not yet committed

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> None:
        if self._verified:
            raise RuntimeError("prefill after verify without commit")
        tokens = list(tokens)
        for first in range(0, len(tokens), self.config.prefill_chunk):
            chunk = tokens[first: first + self.config.prefill_chunk]
            rows, start = len(chunk), self._cache_len
            self._check_positions(start + rows)
            self._make_room(start + rows)
            ids = torch.tensor(chunk, dtype=torch.long, device=self.device)  # [r]
            positions = torch.arange(start, start + rows, device=self.device)  # [r]
            causal = torch.ones(rows, rows, dtype=torch.bool, device=self.device).tril_()  # [r, r]
            start_t = torch.tensor([start], dtype=torch.long, device=self.device)
            forward(self.spec, self.weights, self.cache, ids, positions, start_t, causal, self._length(start + rows),
                    logits=False)
            self._cache_len += rows

    @torch.inference_mode()
    def verify(self, root: int, draft: Draft) -> torch.Tensor:
        """Logits [n + 1 + m, vocab]: row 0 the root, row i + 1 node i, then the m aux tokens."""
        if self._verified:
            raise RuntimeError("verify twice without commit")
        tokens, offsets, tree = step_inputs(root, draft)
        rows, start = tokens.shape[0], self._cache_len
        self._check_positions(start + int(offsets.max()) + 1)
        positions = offsets + start  # [rows] absolute positions
        use_graph = self.graphs is not None and rows <= self.config.max_graph_rows
        padded = row_bucket(max(rows, self.config.min_rows)) if use_graph else rows
        if start + padded > self.cache.max_capacity:  # padding would run past the model's last slot
            use_graph, padded = False, rows
        self._make_room(start + padded)
        length = self._length(start + padded)
        timer = self._start_timer()
        if use_graph:
            logits = self.graphs.run(tokens, positions, start, tree, padded, length)[:rows].clone()
        else:
            logits = self._eager(tokens, positions, start, tree, length)
        self._stop_timer(timer)
        self._verified = rows
        return logits  # [rows, vocab]

    @torch.inference_mode()
    def commit(self, path: Sequence[int]) -> None:
        """Keep the root and the accepted nodes (in path order) right after the committed prefix."""
        if not self._verified:
            raise RuntimeError("commit without verify")
        path = list(path)
        start = self._cache_len
        if path != list(range(len(path))):  # not a prefix of the node order: gather into place
            source = [start + 1 + i for i in path]
            index = self.graphs.upload_index(source) if self.graphs is not None and len(source) <= \
                self.graphs.max_rows else torch.tensor(source, dtype=torch.long, device=self.device)
            self.cache.gather(start, index)
        self._cache_len = start + 1 + len(path)
        self._verified = 0

    # ------------------------------------------------------------------------------------------------ measuring

    def gpu_seconds(self, clear: bool = True) -> float:
        """Seconds the GPU spent in the verify steps since the last call (needs FastConfig(timing=True)); waits for
        the device to finish."""
        if not self._events:
            return 0.0
        self._events[-1][1].synchronize()
        total = sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        if clear:
            self._events.clear()
        return total

    @property
    def graph_count(self) -> int:
        return 0 if self.graphs is None else len(self.graphs.graphs)

    # ------------------------------------------------------------------------------------------------ internals

    def _step_forward(self, ids, positions, start, tree, length) -> torch.Tensor:
        return forward(self.spec, self.weights, self.cache, ids, positions, start, tree, length)

    def _eager(self, tokens: np.ndarray, positions: np.ndarray, start: int, tree: np.ndarray,
               length: int) -> torch.Tensor:
        as_device = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        start_t = torch.tensor([start], dtype=torch.long, device=self.device)
        return forward(self.spec, self.weights, self.cache, as_device(tokens), as_device(positions), start_t,
                       as_device(tree), length)

    def _check_positions(self, end: int) -> None:
        check_positions(end, self.spec.max_positions)

    def _make_room(self, slots: int) -> None:
        if self.cache.ensure(slots) and self.graphs is not None:
            self.graphs.clear()  # the graphs hold the old cache's address

    def _length(self, slots: int) -> int:
        return scan_length(slots, self.min_length, self.cache.capacity)

    def _start_timer(self):
        if not (self.config.timing and self.device.type == "cuda"):
            return None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin, end

    def _stop_timer(self, timer) -> None:
        if timer is not None:
            timer[1].record()
            self._events.append(timer)


def check_positions(end: int, max_positions: int) -> None:
    if end > max_positions:
        raise ValueError(f"sequence would reach {end} tokens, beyond the model's {max_positions} positions")


def scan_length(slots: int, min_length: int, capacity: int) -> int:
    """Slots attention scans: a power of two >= slots (at least min_length), at most the cache capacity."""
    return min(max(pow2(slots), min_length), capacity)


def step_inputs(root: int, draft: Draft) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host-side inputs of a step: tokens [r], position offsets from the root [r] and the tree mask [r, r] (row c is
    visible to row r), for r = 1 + n + m rows (root, nodes, aux). Same mask as tree.ancestor_mask, built with numpy
    because it runs on every step."""
    n, m = draft.n, draft.m
    rows = 1 + n + m
    tokens = np.empty(rows, dtype=np.int64)
    tokens[0] = root
    tokens[1: n + 1] = draft.tokens.cpu().numpy()
    offsets = np.empty(rows, dtype=np.int64)
    tree = np.zeros((rows, rows), dtype=bool)
    parents = draft.parents.cpu().numpy()
    if np.array_equal(parents, np.arange(-1, n - 1)):  # a chain: causal mask, depth = index
        tree[: n + 1, : n + 1] = np.tri(n + 1, dtype=bool)
        offsets[: n + 1] = np.arange(n + 1)
    else:
        tree[0, 0] = True
        offsets[0] = 0
        for i, parent in enumerate(parents.tolist()):
            tree[i + 1, : n + 1] = tree[parent + 1, : n + 1]  # the parent's ancestors (root row is 0)
            tree[i + 1, i + 1] = True
            offsets[i + 1] = offsets[parent + 1] + 1
    if m:
        tokens[n + 1:] = draft.aux_tokens.cpu().numpy()
        offsets[n + 1:] = draft.aux_positions.cpu().numpy()
        tree[n + 1:] = draft.aux_mask.cpu().numpy()
    return tokens, offsets, tree

