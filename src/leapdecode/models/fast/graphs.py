"""CUDA graphs of the step forward, one per (rows bucket, length bucket), captured on first use and replayed.

A step's Python and kernel launches (hundreds of small kernels for a 30-layer model) cost far more than its
arithmetic on a small model. Captured once, a step is one graph launch. Shapes must be static, so a step of r rows
is padded to a bucket R (powers of two up to 16, then multiples of 16; padding rows see only themselves and write
slots past the real ones, which are overwritten later), and attention scans a bucketed number of slots. Per-step
inputs travel in static device buffers, filled from pinned host staging with asynchronous copies: no step
synchronises with the host; the runner's caller does, once, when it reads the accepted length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

StepForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def row_bucket(rows: int) -> int:
    """Padded size of a step of `rows` rows: powers of two up to 16, then multiples of 16 (a 64-node tree plus its
    root, 65 rows, runs as 80 rather than 128)."""
    return pow2(rows) if rows <= 16 else -(-rows // 16) * 16


class StepGraphs:
    """Captures and replays `forward(ids, positions, start, tree, length) -> logits [R, vocab]`."""

    def __init__(self, forward: StepForward, device: torch.device, max_rows: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if max_rows < 1 or row_bucket(max_rows) != max_rows:
            raise ValueError(f"max_rows must be a row bucket (1, 2, 4, 8, 16 or a multiple of 16), got {max_rows}")
        self.forward, self.device, self.max_rows = forward, device, max_rows
        self.pool = torch.cuda.graph_pool_handle()  # graphs run one at a time, so they share one memory pool
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # R -> (ints [2R + 1], tree [R, R])
        # pinned staging: [ids (R), positions (R), start (1)] and the tree mask; `copied` marks the last upload, and
        # the staging is rewritten only after it (normally long done: the caller synchronised after the last step)
        self.staging_ints = torch.zeros(2 * max_rows + 1, dtype=torch.long, pin_memory=True)
        self.staging_tree = torch.zeros(max_rows * max_rows, dtype=torch.bool, pin_memory=True)
        self.staging_index = torch.zeros(max_rows, dtype=torch.long, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.index_copied = torch.cuda.Event()
        self.captures = 0

    def clear(self) -> None:
        """Forget every graph (the KV cache moved)."""
        self.graphs.clear()

    def run(self, tokens: np.ndarray, positions: np.ndarray, start: int, tree: np.ndarray, padded: int,
            length: int) -> torch.Tensor:
        """Upload one step's inputs (r real rows padded to `padded`) and replay its graph. Returns the graph's
        static logits [padded, vocab]; they are overwritten by the next replay."""
        rows = tokens.shape[0]
        self.copied.synchronize()
        ints = self.staging_ints[: 2 * padded + 1].numpy()
        ints[:padded] = 0  # padding rows: token 0 at the root's position, seeing only themselves
        ints[:rows] = tokens
        ints[padded: 2 * padded] = start
        ints[padded: padded + rows] = positions
        ints[2 * padded] = start
        mask = self.staging_tree[: padded * padded].view(padded, padded)
        mask_np = mask.numpy()
        mask_np[:] = False
        mask_np[:rows, :rows] = tree
        pad = np.arange(rows, padded)
        mask_np[pad, pad] = True
        device_ints, device_tree = self._inputs(padded)
        device_ints.copy_(self.staging_ints[: 2 * padded + 1], non_blocking=True)
        device_tree.copy_(mask, non_blocking=True)
        self.copied.record()
        key = (padded, length)
        if key not in self.graphs:
            self.graphs[key] = self._capture(padded, length)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def upload_index(self, values: list[int]) -> torch.Tensor:
        """A small long tensor on the device from pinned staging, without a synchronising copy."""
        self.index_copied.synchronize()
        staging = self.staging_index[: len(values)]
        staging.numpy()[:] = values
        out = torch.empty(len(values), dtype=torch.long, device=self.device)
        out.copy_(staging, non_blocking=True)
        self.index_copied.record()
        return out

    def _inputs(self, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        if padded not in self.inputs:
            self.inputs[padded] = (torch.zeros(2 * padded + 1, dtype=torch.long, device=self.device),
                                   torch.zeros(padded, padded, dtype=torch.bool, device=self.device))
        return self.inputs[padded]

    def _capture(self, padded: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        ints, tree = self._inputs(padded)
        args = (ints[:padded], ints[padded: 2 * padded], ints[2 * padded:], tree, length)
        # Warm up outside the capture (lazy library initialisation must not happen while capturing). It computes
        # this very step, so the values it writes to the cache are the right ones.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.forward(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(*args)
        self.captures += 1
        logger.debug("captured step graph rows=%d length=%d", padded, length)
        return graph, logits
