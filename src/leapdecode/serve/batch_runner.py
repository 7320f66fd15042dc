"""A batched target runner: many sequences, each with its own committed length, verified in one forward pass.

The KV cache is position-indexed and static per slot: every layer holds keys and values [max_batch, kv_heads,
capacity, head_dim], and sequence s lives in cache row `s.row`, its committed tokens in slots [0, s.length). A step
feeds each sequence its root and draft nodes (rows = 1 + n + m, possibly 1 when it drafts nothing), right-padded to
the batch's widest step R. Row i of sequence s is written to slot s.length + i and sits at position
s.length + depth(i); a 4D additive mask [B, 1, R, kv] lets it see slots [0, s.length) and its own tree ancestors,
nothing else, so sequences never see each other's padding or rejected nodes. `commit` moves the root and the accepted
path into consecutive slots (a no-op for an accepted chain prefix) and raises s.length; whatever lies beyond is stale
and is overwritten by the next step, so nothing is ever rolled back or copied out.

Rows are kept compact: the live sequences occupy cache rows [0, len(slots)), so a decode step is one forward pass
over a plain slice of the cache (no gather). Releasing a sequence moves the last one into its row. Prompts are
prefilled one sequence and one chunk at a time, over a one-row slice.

The runner never decides anything: the scheduler chooses who is in a step and how much each drafts; acceptance is
`leapdecode.accept`. The runner's invariant is the single-sequence HFRunner's: a slot's cache holds its committed
context except the root.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from leapdecode.drafters.base import Draft
from leapdecode.models.hf import read_model_facts
from leapdecode.tree import ancestor_mask, depths


class Slot:
    """One sequence's place in the batch cache."""

    def __init__(self, row: int) -> None:
        self.row = row  # cache row; changes when another sequence is released (rows stay compact)
        self.length = 0  # committed tokens in the cache (the root is not among them)
        self.pending = 0  # rows written by the last verify, not yet committed

    def __repr__(self) -> str:
        return f"Slot(row={self.row}, length={self.length})"


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot. Each forward writes its rows at the slot indices the runner set."""

    is_sliding = False  # every layer keeps the whole sequence; sliding windows live in the mask (as in HFRunner)

    def __init__(self, runner: BatchRunner) -> None:
        super().__init__()
        self.runner = runner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, k_dim = key_states.shape
        shape = (self.runner.max_batch, heads, self.runner.capacity)
        self.keys = torch.zeros(*shape, k_dim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(*shape, value_states.shape[-1], dtype=value_states.dtype, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states [b, heads, rows, dim] for cache rows [start, stop): store them, return the visible window."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.runner.rows
        index = self.runner.write_index[:, None, :, None]  # [b, 1, rows, 1] slot of each step row
        keys, values = self.keys[start:stop], self.values[start:stop]  # views of the live rows
        keys.scatter_(2, index.expand_as(key_states), key_states)
        values.scatter_(2, index.expand_as(value_states), value_states)
        kv = self.runner.kv_used
        return keys[:, :, :kv], values[:, :, :kv]  # [b, heads, kv, dim]; the mask hides stale and foreign slots

    def grow(self, capacity: int) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def move_row(self, source: int, target: int, length: int) -> None:
        if self.is_initialized:
            self.keys[target, :, :length] = self.keys[source, :, :length]
            self.values[target, :, :length] = self.values[source, :, :length]

    def gather(self, row: int, start: int, index: torch.Tensor) -> None:
        """Copy slots `index` of `row` to consecutive slots from `start` (the accepted path, into place)."""
        if self.is_initialized:
            stop = start + index.numel()
            self.keys[row, :, start:stop] = self.keys[row].index_select(1, index)
            self.values[row, :, start:stop] = self.values[row].index_select(1, index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.runner.kv_used, 0

    def get_seq_length(self) -> int:
        return 0  # per-slot lengths differ; positions and masks are always passed explicitly

    def get_max_length(self) -> int:
        return -1


class BatchRunner:
    """Runs one Hugging Face causal LM over a batch of slots (see the module docstring)."""

    padded = True  # a pass computes (sequences spanned) x (widest step) rows

    def __init__(self, hf_model, max_batch: int, capacity: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = hf_model
        config = read_model_facts(self, hf_model, "BatchRunner")
        self.max_batch = max_batch
        self.capacity = capacity
        self.slots: list[Slot] = []  # slots[i].row == i
        self.cache = Cache(layers=[_SlotLayer(self) for _ in range(config.num_hidden_layers)])
        self._last_logits_only = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        # set before each forward, read by the layers
        self.rows = (0, 0)  # cache rows [start, stop) of this forward
        self.write_index = torch.zeros(0, 0, dtype=torch.long)  # [b, rows] slot each step row is written to
        self.kv_used = 0  # slots [0, kv_used) are handed to attention

    # ------------------------------------------------------------------------------------------------- slots

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.slots)

    def allocate(self) -> Slot:
        if not self.free_slots:
            raise RuntimeError(f"all {self.max_batch} batch slots are in use")
        slot = Slot(len(self.slots))
        self.slots.append(slot)
        return slot

    @torch.inference_mode()
    def release(self, slot: Slot) -> None:
        """Free `slot`; the last sequence moves into its row so live rows stay [0, len(slots))."""
        if slot.row < 0 or slot.row >= len(self.slots) or self.slots[slot.row] is not slot:
            raise ValueError(f"{slot} is not held by this runner")
        last = self.slots.pop()
        if last is not slot:
            for layer in self.cache.layers:
                layer.move_row(last.row, slot.row, last.length + last.pending)  # pending: verified, not committed
            last.row = slot.row
            self.slots[slot.row] = last
        slot.row = -1

    def span(self, slots: Sequence[Slot]) -> int:
        """Sequences a pass over `slots` computes: every cache row between the first and the last (the others in
        that range carry padding rows)."""
        rows = [slot.row for slot in slots]
        return max(rows) - min(rows) + 1

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self.capacity = max(needed, 2 * self.capacity)
        for layer in self.cache.layers:
            layer.grow(self.capacity)

    # ------------------------------------------------------------------------------------------- forward passes

    @torch.inference_mode()
    def prefill(self, slot: Slot, tokens: Sequence[int]) -> None:
        """Append `tokens` (a prompt chunk) to `slot`'s cache: one causal forward over that slot's row only."""
        if slot.pending:
            raise RuntimeError("prefill after verify without commit")
        n = len(tokens)
        if n == 0:
            return
        start = slot.length
        slots = torch.arange(start, start + n)  # [n] slot == position for committed tokens
        visible = torch.arange(start + n)[None, :] <= slots[:, None]  # [n, kv] causal over prefix + chunk
        masks = self._masks(visible[None], slots[None], torch.arange(start + n)[None])
        self._forward(torch.tensor([list(tokens)]), slots[None], masks, (slot.row, slot.row + 1), slots[None],
                      last_only=True)
        slot.length += n

    @torch.inference_mode()
    def verify(self, batch: Sequence[tuple[Slot, int, Draft]]) -> list[torch.Tensor]:
        """One forward over every (slot, root, draft): logits [1 + n + m, vocab] per entry, in order.

        The pass covers the contiguous cache rows spanned by the batch; slots in that span without an entry (a
        sequence still prefilling) only get padding rows written beyond their length, which the next write replaces.
        """
        if not batch:
            return []
        steps = [_step_rows(root, draft) for _, root, draft in batch]  # (ids [r], offsets [r], tree [r, r])
        start = min(s.row for s, _, _ in batch)
        stop = max(s.row for s, _, _ in batch) + 1
        b, rows = stop - start, max(ids.numel() for ids, _, _ in steps)
        lengths = torch.tensor([s.length for s in self.slots[start:stop]])  # [b]
        write = lengths[:, None] + torch.arange(rows)[None, :]  # [b, rows] padding rows too: beyond each length
        kv = int(lengths.max()) + rows
        self._ensure_capacity(kv)
        ids = torch.zeros(b, rows, dtype=torch.long)  # [b, rows]
        positions = write.clone()  # [b, rows]
        key_pos = torch.arange(kv).repeat(b, 1)  # [b, kv] position held by each slot
        visible = torch.arange(kv)[None, None, :] < lengths[:, None, None]  # [b, 1, kv] committed prefix
        visible = visible.expand(b, rows, kv).clone()  # [b, rows, kv]
        visible.scatter_(2, write[:, :, None], True)  # every row sees itself (padding rows: only themselves)
        for (slot, _, _), (step_ids, offsets, tree) in zip(batch, steps):
            i, r, length = slot.row - start, step_ids.numel(), slot.length
            if slot.pending:
                raise RuntimeError(f"verify twice without commit for {slot}")
            ids[i, :r] = step_ids
            positions[i, :r] = length + offsets
            key_pos[i, length : length + r] = length + offsets
            visible[i, :r, length : length + r] = tree
            slot.pending = r
        masks = self._masks(visible, positions, key_pos)
        logits = self._forward(ids, positions, masks, (start, stop), write, kv=kv)  # [b, rows, vocab]
        return [logits[slot.row - start, : step[0].numel()] for (slot, _, _), step in zip(batch, steps)]

    @torch.inference_mode()
    def commit(self, slot: Slot, path: Sequence[int]) -> None:
        """Keep the root and the accepted nodes (in path order) right after `slot`'s committed prefix."""
        if not slot.pending:
            raise RuntimeError(f"commit without verify for {slot}")
        start = slot.length
        if list(path) != list(range(len(path))):  # not a prefix of the node order: gather into place
            index = torch.tensor([start] + [start + 1 + i for i in path], device=self.device)
            for layer in self.cache.layers:
                layer.gather(slot.row, start, index)
        slot.length = start + 1 + len(path)
        slot.pending = 0

    # -------------------------------------------------------------------------------------------------- helpers

    def _masks(self, visible: torch.Tensor, positions: torch.Tensor, key_pos: torch.Tensor):
        """bool visible [b, rows, kv] -> additive mask [b, 1, rows, kv] (a dict per layer type with sliding layers)."""
        full = self._additive(visible)
        if self.sliding_window is None:
            return full
        local = visible & (positions[:, :, None] - key_pos[:, None, :] < self.sliding_window)
        return {"full_attention": full, "sliding_attention": self._additive(local)}

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, blocked)[:, None].to(self.device)

    def _forward(self, ids, positions, masks, rows: tuple[int, int], write: torch.Tensor, kv: int | None = None,
                 last_only: bool = False) -> torch.Tensor:
        self.rows = rows
        self.write_index = write.to(self.device)
        self.kv_used = int(write.max()) + 1 if kv is None else kv
        self._ensure_capacity(self.kv_used)
        extra = {"logits_to_keep": 1} if last_only and self._last_logits_only else {}
        out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device), attention_mask=masks,
                         past_key_values=self.cache, use_cache=True, **extra)
        return out.logits


def _step_rows(root: int, draft: Draft) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's rows: ids [r] (root, nodes, aux), offsets from the root's position [r], visibility among them [r, r]."""
    n = draft.n
    ids = torch.cat([torch.tensor([root]), draft.tokens.cpu()])  # [n + 1]
    offsets = torch.tensor([0] + depths(draft.parents))  # [n + 1] root at 0, nodes at their depth
    tree = ancestor_mask(draft.parents)  # [n + 1, n + 1]
    if draft.m:  # auxiliary branch (Lookahead): after the nodes, invisible to them
        ids = torch.cat([ids, draft.aux_tokens.cpu()])
        offsets = torch.cat([offsets, draft.aux_positions.cpu()])
        tree = torch.cat([torch.cat([tree, torch.zeros(n + 1, draft.m, dtype=torch.bool)], 1),
                          draft.aux_mask.cpu()], 0)  # [n + 1 + m, n + 1 + m]
    return ids, offsets, tree
