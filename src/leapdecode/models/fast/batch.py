"""The fast forward for a server: many sequences, each with its own KV cache and length, verified in one pass.

Same protocol as serve.batch_runner.BatchRunner (allocate, release, prefill, verify a batch, commit, span,
padded), on the fast runner's weights (shared with the Model's FastRunner, not copied). Each sequence owns a
StaticCache; a step concatenates every sequence's rows (root, draft nodes, aux tokens), runs each projection once
over all of them (on a CPU the weights are streamed once per step, whatever the batch), and each sequence attends
against its own cache with its own tree mask (forward.forward_batch: attend.c on a CPU, one padded SDPA call per
layer on a GPU). No padding rows: a sequence that drafts nothing costs one row, and sequences still prefilling
are simply not in the step.

Eager only (no CUDA graphs): ragged batches change shape every step. The invariant is FastRunner's: committed slot
s of a sequence's cache holds its token at position s; the root is not in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leapdecode.drafters.base import Draft
from leapdecode.models.fast.cache import StaticCache
from leapdecode.models.fast.forward import Segment, forward_batch
from leapdecode.models.fast.runner import FastRunner, check_positions, scan_length, step_inputs


class FastSlot:
    """One sequence's place: its own cache, committed length and rows awaiting commit. The cache is allocated on
    first use: admitting a request allocates nothing, so an out-of-memory error surfaces in a prefill or a step,
    where the scheduler fails requests, not in its admission loop."""

    def __init__(self, make_cache) -> None:
        self._make_cache = make_cache
        self._cache: StaticCache | None = None
        self.length = 0  # committed tokens in the cache (the root is not among them)
        self.pending = 0  # rows written by the last verify, not yet committed

    @property
    def cache(self) -> StaticCache:
        if self._cache is None:
            self._cache = self._make_cache()
        return self._cache

    def __repr__(self) -> str:
        return f"FastSlot(length={self.length})"


class FastBatchRunner:
    """A batch of sequences over a FastRunner's weights (see the module docstring)."""

    padded = False  # a pass computes each sequence's own rows (not span x widest step)

    def __init__(self, runner: FastRunner, max_batch: int, capacity: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 KV slots, got {capacity}")
        self.spec, self.weights = runner.spec, runner.weights
        self.device, self.dtype = runner.device, runner.dtype
        self.vocab_size = self.spec.vocab_size
        self.max_positions = self.spec.max_positions
        self.max_batch = max_batch
        self.capacity = min(capacity, self.max_positions)
        self.min_length = runner.min_length
        self.prefill_chunk = runner.config.prefill_chunk
        self.slots: list[FastSlot] = []

    # ------------------------------------------------------------------------------------------------- slots

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.slots)

    def allocate(self) -> FastSlot:
        if not self.free_slots:
            raise RuntimeError(f"all {self.max_batch} batch slots are in use")
        spec = self.spec
        slot = FastSlot(lambda: StaticCache(spec.n_layers, spec.n_kv_heads, spec.head_dim, self.capacity,
                                            self.max_positions, self.dtype, self.device))
        self.slots.append(slot)
        return slot

    def release(self, slot: FastSlot) -> None:
        if slot not in self.slots:
            raise ValueError(f"{slot} is not held by this runner")
        self.slots.remove(slot)
        slot._cache = None  # free its memory now, not when the request object goes

    def span(self, slots: Sequence[FastSlot]) -> int:
        """Sequences a pass over `slots` computes: exactly those (no padding rows for others)."""
        return len(slots)

    # ------------------------------------------------------------------------------------------- forward passes

    @torch.inference_mode()
    def prefill(self, slot: FastSlot, tokens: Sequence[int]) -> None:
        """Append `tokens` (a prompt chunk) to `slot`'s cache: causal forward passes over that sequence alone."""
        if slot.pending:
            raise RuntimeError("prefill after verify without commit")
        tokens = list(tokens)
        check_positions(slot.length + len(tokens), self.max_positions)  # before any chunk: all or nothing
        for first in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[first: first + self.prefill_chunk]
            rows, start = len(chunk), slot.length
            slot.cache.ensure(start + rows)
            causal = torch.ones(rows, rows, dtype=torch.bool, device=self.device).tril_()  # [r, r]
            length = scan_length(start + rows, self.min_length, slot.cache.capacity)
            segment = Segment(slot.cache, 0, rows, self._long([start]), causal, length)
            forward_batch(self.spec, self.weights, self._long(chunk), torch.arange(start, start + rows,
                          device=self.device), [segment], logits=False)
            slot.length += rows

    @torch.inference_mode()
    def verify(self, batch: Sequence[tuple[FastSlot, int, Draft]]) -> list[torch.Tensor]:
        """One forward over every (slot, root, draft): logits [1 + n + m, vocab] per entry, in order."""
        if not batch:
            return []
        ids, positions, segments = [], [], []
        first = 0
        for i, (slot, root, draft) in enumerate(batch):
            if slot.pending or any(slot is other for other, _, _ in batch[:i]):  # pending, or twice in this batch
                raise RuntimeError(f"verify twice without commit for {slot}")
            if draft.m and slot.length + int(draft.aux_positions.max()) + 1 > self.max_positions:
                draft = Draft(draft.tokens, draft.parents, draft.q)  # an unverified aux branch past the model's
                # last position is dropped (its drafter sees no rows for it), so it cannot fail the whole batch
            tokens, offsets, tree = step_inputs(root, draft)  # [r], [r], [r, r]
            rows, start = tokens.shape[0], slot.length
            check_positions(start + int(offsets.max()) + 1, self.max_positions)
            slot.cache.ensure(start + rows)
            ids.append(torch.from_numpy(tokens))
            positions.append(torch.from_numpy(offsets + start))
            segments.append(Segment(slot.cache, first, rows, self._long([start]), torch.from_numpy(tree).to(
                self.device), scan_length(start + rows, self.min_length, slot.cache.capacity)))
            first += rows
        logits = forward_batch(self.spec, self.weights, torch.cat(ids).to(self.device),
                               torch.cat(positions).to(self.device), segments)  # [rows of all, vocab]
        out = []  # pending is set only after the pass: a failed pass leaves every slot as it was
        for (slot, _, _), seg in zip(batch, segments):
            slot.pending = seg.rows
            out.append(logits[seg.first: seg.first + seg.rows])
        return out

    @torch.inference_mode()
    def commit(self, slot: FastSlot, path: Sequence[int]) -> None:
        """Keep the root and the accepted nodes (in path order) right after `slot`'s committed prefix."""
        if not slot.pending:
            raise RuntimeError(f"commit without verify for {slot}")
        path, start = list(path), slot.length
        if path != list(range(len(path))):  # not a prefix of the node order: gather into place
            slot.cache.gather(start, self._long([start + 1 + i for i in path]))
        slot.length = start + 1 + len(path)
        slot.pending = 0

    # -------------------------------------------------------------------------------------------------- helpers

    def _long(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=self.device)
