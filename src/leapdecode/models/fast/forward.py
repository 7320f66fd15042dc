"""The fast runner's forward pass: R rows (the root, the draft nodes, aux tokens, padding) against the static cache,
or the rows of several sequences, each against its own cache (forward_batch, for the server's batched runner).

A one-sequence pass is tensor code with shapes fixed by (R, length), so it can be captured as a CUDA graph and
replayed: the per-step inputs (ids, positions, the first slot, the tree mask) live in tensors, never in Python
numbers, and nothing reads a value back to the host (the CPU attention kernel's path reads the start slots; it
never runs in a graph). A batch of sequences (the server's) runs eagerly: its shapes change every step.

Attention. Row r is written at slot start + r and sees
- every committed slot < start (the prefix),
- the slots of its tree ancestors and itself (tree[r, c] for slot start + c),
- on sliding-window layers, only keys whose position is within the window (committed slot s holds position s; a
  new slot's position is that row's position).
The mask (which slots each row sees) is built once per step and sequence (per distinct window) and shared by all
layers. In a batch every projection runs once over all sequences' rows. Attention:
- on a float32 CPU, for steps of at most attend.MAX_ROWS rows per sequence (decode and verify): attend.c, one call
  per layer for all sequences, each output summed in a fixed order (attend.py);
- elsewhere, one sequence (prefill chunks, a lone request on a GPU): torch's SDPA, with the mask as an additive
  bias. Grouped-query attention without copying K/V: the `group` query heads that share a key/value head are
  folded into the query-row axis, so SDPA sees kv_heads heads of group * R query rows each ([1, kv, group * R,
  head_dim]) and the same K/V views; the bias is tiled group times. Scanning `length` slots (a bucket, not the
  whole cache) keeps the work proportional to the context;
- elsewhere, several sequences (a server's step on a GPU): one SDPA call per layer for all of them (PaddedBatch).
  Their caches are copied once per step, side by side, padded to the longest scan; each layer writes its new keys
  and values there, attends over it with padded queries and masks, and the new slots are copied back to every
  sequence's cache after the last layer. Per-sequence calls cost kernel launches in proportion to the sequences
  (a 16-sequence step on an H200 took 2.8x as long that way, BENCHMARKS.md 0j); the padded copy costs work in
  proportion to sequences x longest scan, so a batch whose scans differ widely (more than PAD_WASTE times the
  slots it needs) attends per sequence instead. Weights.padded_attention: None (default) = off the CPU only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from leapdecode.models.fast import attend
from leapdecode.models.fast.cache import StaticCache
from leapdecode.models.fast.cpu import CpuLinear, cpu_linear
from leapdecode.models.fast.weights import LayerWeights, Spec, Weights


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a (batched) step: batch rows [first, first + rows), written to `cache` from slot
    `start` ([1] long); tree [rows, rows] bool says which of its new rows each row sees; attention scans `length`
    slots of its cache."""

    cache: StaticCache
    first: int
    rows: int
    start: torch.Tensor
    tree: torch.Tensor
    length: int


def forward(spec: Spec, weights: Weights, cache: StaticCache, ids: torch.Tensor, positions: torch.Tensor,
            start: torch.Tensor, tree: torch.Tensor, length: int, logits: bool = True) -> torch.Tensor | None:
    """ids [R] long, positions [R] long, start [1] long (slot of row 0), tree [R, R] bool (row r sees new row c).

    Writes the rows' keys and values at slots start .. start + R - 1 of every layer and returns the logits
    [R, vocab] (None when `logits` is False: prefill needs only the cache). `length` >= start + R slots are scanned.
    """
    return forward_batch(spec, weights, ids, positions, [Segment(cache, 0, ids.shape[0], start, tree, length)],
                         logits)


def forward_batch(spec: Spec, weights: Weights, ids: torch.Tensor, positions: torch.Tensor,
                  segments: list[Segment], logits: bool = True) -> torch.Tensor | None:
    """Several sequences in one pass: ids [R] and positions [R] are their rows, one segment after the other.

    Every projection multiplies all R rows at once (the weights are read once for the whole batch); each segment
    attends against its own cache and mask (attend.c, PaddedBatch or per segment: see the module docstring).
    Returns logits [R, vocab] (None without `logits`)."""
    x = F.embedding(ids, weights.embed)  # [R, hidden]
    if spec.embed_scale:
        x = x * weights.embed_scale
    rotary = [rotary_factors(spec, table, positions) for table in weights.rope]
    windows = sorted(set(spec.windows), key=lambda w: -1 if w is None else w)
    masks = [{window: attention_mask(positions[seg.first: seg.first + seg.rows], seg.start, seg.tree, seg.length,
                                     window) for window in windows} for seg in segments]  # [rows, length] each
    padded = None
    if weights.cpu_attention and attend.usable(x, spec.head_dim, [seg.rows for seg in segments]):
        plan = attend.step([seg.first for seg in segments], [seg.rows for seg in segments],
                           [int(seg.start) for seg in segments], [seg.cache.kv for seg in segments], masks)
        attention_of = [partial(attend.attend, plan=plan, layer=i, window=spec.windows[i], heads=spec.n_heads,
                                kv_heads=spec.n_kv_heads, scale=spec.attn_scale) for i in range(spec.n_layers)]
    elif len(segments) > 1 and PaddedBatch.pays(weights, x, segments):
        padded = PaddedBatch.gather(spec, segments, masks, x.dtype)
        attention_of = [partial(padded.attention, spec=spec, layer=i) for i in range(spec.n_layers)]
    else:
        biases = [{window: attention_bias(spec, mask[window], x.dtype) for window in windows} for mask in masks]
        slots = [seg.start + torch.arange(seg.rows, device=ids.device) for seg in segments]  # [rows] each
        attention_of = [partial(attention_per_sequence, spec=spec, layer=i, segments=segments, slots=slots,
                                biases=biases) for i in range(spec.n_layers)]
    for i, layer in enumerate(weights.layers):
        x = block(spec, layer, x, rotary[spec.rope_of_layer[i]], attention_of[i])
    if padded is not None:
        padded.write_back(segments)
    if not logits:
        return None
    out = linear(rms_norm(spec, x, weights.final_norm), weights.lm_head, weights.lm_head_cpu)  # [R, vocab]
    if spec.final_softcap is not None:
        out = torch.tanh(out / spec.final_softcap) * spec.final_softcap
    return out


def block(spec: Spec, layer: LayerWeights, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
          attention_of_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One decoder layer on x [R, hidden]; `attention_of_rows` takes the rotated qkv [R, qkv_heads, d] of every
    sequence, stores their keys and values in this layer's caches and returns the attention output [R, heads * d]."""
    rows, d, heads, kv_heads = x.shape[0], spec.head_dim, spec.n_heads, spec.n_kv_heads
    qkv = linear(rms_norm(spec, x, layer.attn_norm), layer.qkv, layer.qkv_cpu, layer.qkv_bias)
    qkv = qkv.contiguous().view(rows, spec.qkv_heads, d)
    if layer.qk_norm is not None:  # Gemma: RMS-normalise each q and k head in float32, v untouched
        qk = F.rms_norm(qkv[:, : heads + kv_heads].float(), (d,), None, spec.eps) * layer.qk_norm
        qkv = torch.cat([qk.to(x.dtype), qkv[:, heads + kv_heads:]], dim=1)  # [R, qkv_heads, d]
    cos, sin = rotary  # [R, qkv_heads, d]; the v heads get cos 1, sin 0 and pass through unchanged
    swapped = qkv.view(rows, spec.qkv_heads, 2, d // 2).flip(2).view(rows, spec.qkv_heads, d)  # halves swapped
    qkv = torch.addcmul(qkv * cos, swapped, sin)  # rotate q and k: x * cos + rotate_half(x) * sin
    attn = attention_of_rows(qkv)  # [R, heads * d]
    if spec.family == "gemma3":  # sandwich norms: normalise the sublayer output before the residual add
        x = x + rms_norm(spec, linear(attn, layer.o, layer.o_cpu), layer.post_attn_norm)
    else:
        x = _residual_linear(x, attn, layer.o, layer.o_cpu, layer.o_bias)
    gate_up = linear(rms_norm(spec, x, layer.mlp_norm), layer.gate_up, layer.gate_up_cpu, layer.gate_up_bias)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = _activation(spec.activation, gate) * up  # [R, intermediate]
    if spec.family == "gemma3":
        return x + rms_norm(spec, linear(hidden, layer.down, layer.down_cpu), layer.post_mlp_norm)
    return _residual_linear(x, hidden, layer.down, layer.down_cpu, layer.down_bias)


def attention_per_sequence(qkv: torch.Tensor, spec: Spec, layer: int, segments: list[Segment],
                           slots: list[torch.Tensor], biases: list[dict[int | None, torch.Tensor]]) -> torch.Tensor:
    """Layer `layer`'s attention through torch's SDPA, one call per sequence: qkv [R, qkv_heads, d] (rotated) of
    every segment, the slots each segment's rows are written to -> [R, heads * d]."""
    return torch.cat([attention(spec, seg.cache.layer(layer), qkv[seg.first: seg.first + seg.rows], where,
                                seg.length, bias[spec.windows[layer]])
                      for seg, where, bias in zip(segments, slots, biases)])


PAD_WASTE = 4.0  # a padded batch may scan at most this many times the slots its sequences need (PaddedBatch.pays)


@dataclass(frozen=True)
class PaddedBatch:
    """A step's sequences side by side, for one SDPA call per layer (see the module docstring): copies of their
    caches padded to the longest scan, and where each of the step's R rows goes in the padded layout."""

    kv: torch.Tensor  # [layers, B, length, 2, kv_heads, d] the caches' first `length` slots, zeros past each scan
    batch_of_row: torch.Tensor  # [R] long: the sequence of each row
    query_of_row: torch.Tensor  # [R] long: its row within its sequence
    slot_of_row: torch.Tensor  # [R] long: the cache slot it writes
    biases: dict[int | None, torch.Tensor]  # per window: additive mask [B, 1, group * rows, length]

    @staticmethod
    def pays(weights: Weights, x: torch.Tensor, segments: list[Segment]) -> bool:
        """Whether a batch attends through one padded call per layer: as weights.padded_attention says (None: off
        the CPU), and only where padding to the longest scan costs at most PAD_WASTE times the slots it needs."""
        wanted = weights.padded_attention if weights.padded_attention is not None else x.device.type != "cpu"
        longest, total = max(seg.length for seg in segments), sum(seg.length for seg in segments)
        return wanted and len(segments) * longest <= PAD_WASTE * total

    @staticmethod
    def gather(spec: Spec, segments: list[Segment], masks: list[dict[int | None, torch.Tensor]],
               dtype: torch.dtype) -> PaddedBatch:
        """Copy every segment's cache (one copy per sequence, all layers at once) and pad its masks: a row past a
        sequence's own rows sees slot 0 only (finite, and never read back)."""
        cache = segments[0].cache.kv  # [layers, capacity, 2, kv_heads, d]
        device, length, rows = cache.device, max(seg.length for seg in segments), max(seg.rows for seg in segments)
        kv = torch.zeros((cache.shape[0], len(segments), length) + tuple(cache.shape[2:]), dtype=cache.dtype,
                         device=device)
        for b, seg in enumerate(segments):
            kv[:, b, : seg.length] = seg.cache.kv[:, : seg.length]
        batch_of_row = torch.tensor([b for b, seg in enumerate(segments) for _ in range(seg.rows)], device=device)
        query_of_row = torch.tensor([r for seg in segments for r in range(seg.rows)], device=device)  # [R]
        starts = torch.cat([seg.start for seg in segments])  # [B] on the device: no read-back
        slot_of_row = starts[batch_of_row] + query_of_row  # [R]
        biases = {}
        for window in masks[0]:
            seen = torch.zeros(len(segments), rows, length, dtype=torch.bool, device=device)  # [B, rows, length]
            seen[:, :, 0] = True
            for b, (seg, mask) in enumerate(zip(segments, masks)):
                seen[b, : seg.rows, : seg.length] = mask[window]
            bias = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))
            biases[window] = bias.repeat(1, spec.group, 1)[:, None]  # rows ordered (group member, row)
        return PaddedBatch(kv, batch_of_row, query_of_row, slot_of_row, biases)

    def attention(self, qkv: torch.Tensor, spec: Spec, layer: int) -> torch.Tensor:
        """Layer `layer`'s attention for every row: qkv [R, qkv_heads, d] (rotated) -> [R, heads * d]; the rows'
        keys and values are stored in the padded copy (write_back moves them to the caches)."""
        rows_all, d, heads, kv_heads, group = qkv.shape[0], spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.group
        kv = self.kv[layer]  # [B, length, 2, kv_heads, d]
        kv[self.batch_of_row, self.slot_of_row] = qkv[:, heads:].reshape(rows_all, 2, kv_heads, d)
        batch, rows = kv.shape[0], self.biases[spec.windows[layer]].shape[2] // group
        keys, values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, kv_heads, length, d] each
        q = qkv.new_zeros(batch, rows, heads, d)
        q[self.batch_of_row, self.query_of_row] = qkv[:, :heads]
        q = q.view(batch, rows, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * rows, d)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.biases[spec.windows[layer]],
                                              scale=spec.attn_scale)  # [B, kv_heads, group * rows, d]
        attn = attn.reshape(batch, kv_heads, group, rows, d).permute(0, 3, 1, 2, 4).reshape(batch, rows, heads * d)
        return attn[self.batch_of_row, self.query_of_row]  # [R, heads * d]

    def write_back(self, segments: list[Segment]) -> None:
        """Copy each sequence's new slots (all layers) from the padded copy to its own cache."""
        new = self.kv[:, self.batch_of_row, self.slot_of_row]  # [layers, R, 2, kv_heads, d]
        for seg in segments:
            rows = slice(seg.first, seg.first + seg.rows)
            seg.cache.kv.index_copy_(1, self.slot_of_row[rows], new[:, rows])


def attention(spec: Spec, kv_cache: torch.Tensor, qkv: torch.Tensor, slots: torch.Tensor, length: int,
              bias: torch.Tensor) -> torch.Tensor:
    """One sequence's rows qkv [r, qkv_heads, d] (rotated): store their keys and values at `slots` [r] of its
    cache, attend over its first `length` slots, return [r, heads * d]."""
    rows, d, heads, kv_heads = qkv.shape[0], spec.head_dim, spec.n_heads, spec.n_kv_heads
    kv_cache.index_copy_(0, slots, qkv[:, heads:].reshape(rows, 2, kv_heads, d))  # k and v of every row, one write
    keys = kv_cache[:length, 0].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, length, d] (strided view)
    values = kv_cache[:length, 1].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, length, d]
    group = spec.group
    q = qkv[:, :heads].reshape(rows, kv_heads, group, d).permute(1, 2, 0, 3).reshape(1, kv_heads, group * rows, d)
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=spec.attn_scale)
    return attn.reshape(kv_heads, group, rows, d).permute(2, 0, 1, 3).reshape(rows, heads * d)


def linear(x: torch.Tensor, weight: torch.Tensor, cpu: CpuLinear | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, in] @ weight.T (+ bias) -> [R, out]; weight [out, in]. With `cpu` layouts (CPU devices, see cpu.py)
    the product reads the layout that is fastest for R rows."""
    if cpu is None:
        return F.linear(x, weight, bias)
    return cpu_linear(x, weight, cpu, bias)


def rms_norm(spec: Spec, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Llama: weight * normalised x (fused kernel). Gemma: float32 normalisation times (1 + w), cast back."""
    if spec.family == "gemma3":
        return F.rms_norm(x.float(), (x.shape[-1],), weight, spec.eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, spec.eps)


def rotary_factors(spec: Spec, table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for every head of the fused q/k/v output: [R, qkv_heads, d] each (v heads: 1 and 0)."""
    rows, d = positions.shape[0], spec.head_dim
    factors = table.index_select(0, positions)  # [R, 2, d]
    rotated = spec.n_heads + spec.n_kv_heads
    cos = torch.cat([factors[:, 0:1].expand(rows, rotated, d),
                     torch.ones(1, 1, d, dtype=table.dtype, device=table.device).expand(rows, spec.n_kv_heads, d)], 1)
    sin = torch.cat([factors[:, 1:2].expand(rows, rotated, d),
                     torch.zeros(1, 1, d, dtype=table.dtype, device=table.device).expand(rows, spec.n_kv_heads, d)],
                    1)
    return cos, sin


def attention_mask(positions: torch.Tensor, start: torch.Tensor, tree: torch.Tensor, length: int,
                   window: int | None) -> torch.Tensor:
    """[R, length] bool: whether row r may attend to slot s."""
    rows = positions.shape[0]
    keys = torch.arange(length, device=positions.device)  # [length] slot index
    column = keys - start  # [length] new-row index of each slot (valid in [0, R))
    new = (column >= 0) & (column < rows)
    column = column.clamp(0, rows - 1)
    seen = (tree.index_select(1, column) & new) | (keys < start)  # [R, length] tree part | committed prefix
    if window is not None:  # committed slot s holds position s; a new slot holds its row's position
        key_positions = torch.where(new, positions.index_select(0, column), keys)  # [length]
        seen = seen & (positions[:, None] - key_positions[None, :] < window)
    return seen


def attention_bias(spec: Spec, seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's additive mask [1, 1, group * R, length] from attention_mask's [R, length]: 0 where seen, -inf
    elsewhere, rows ordered (group member, row) like the folded queries."""
    bias = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))
    return bias.repeat(spec.group, 1)[None, None]


def _residual_linear(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, cpu: CpuLinear | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x + a @ weight.T (+ bias): one GEMM with the residual as its accumulator when there is no bias (GPU)."""
    if bias is None and cpu is None:
        return torch.addmm(x, a, weight.t())
    return x + linear(a, weight, cpu, bias)


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")  # gelu_pytorch_tanh, gelu_python_tanh, gelu_new, gelu_fast
