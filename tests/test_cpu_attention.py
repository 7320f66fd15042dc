"""The CPU attention kernel (models/fast/attend.py, attend.c): it agrees with softmax attention computed in float64,
stores the rows' keys and values, gives a sequence the same bits whichever sequences share its step and however
long the scanned span is, and with it a tree verify step computes every token's logits to the same bits as plain
decoding of that token does (torch's SDPA does not)."""

from __future__ import annotations

import pytest
import torch

from leapdecode.drafters.base import Draft
from leapdecode.models.fast import FastConfig, FastRunner, attend, kernels
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.models.tiny import tiny_model

CANNOT_BUILD = ("no C compiler", "lacks AVX2", "written for x86-64", "cannot read this CPU", "turned off")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    reason = kernels.unavailable_reason()
    if reason is not None and any(r in reason for r in CANNOT_BUILD):
        pytest.skip(f"the CPU kernels cannot exist here: {reason}")
    assert reason is None, f"the kernels should build on this machine but: {reason}"


def make_case(seed: int, heads: int, kv_heads: int, d: int, starts: list[int], rows: list[int], length: int,
              window: int | None = None):
    """Random caches and rows; per sequence a mask with the prefix, a random tree over its rows and a window."""
    gen = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, length + 8, 2, kv_heads, d, generator=gen) for _ in rows]  # 2 layers
    qkv = torch.randn(sum(rows), heads + 2 * kv_heads, d, generator=gen)
    masks = []
    for start, r in zip(starts, rows):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, r)]
        tree = torch.eye(r, dtype=torch.bool)
        for i in range(1, r):
            tree[i] |= tree[parents[i]]
        m = torch.zeros(r, length, dtype=torch.bool)
        m[:, :start] = True
        m[:, start: start + r] = tree
        if window is not None:  # row i's position: start + depth; keys of the prefix sit at their slot
            depth = tree.sum(1) - 1
            m[:, :start] &= (start + depth[:, None] - torch.arange(start)[None, :]) < window
        masks.append({window: m})
    return caches, qkv, masks


def reference(caches, qkv, masks, starts, rows, layer, heads, kv_heads, scale, window=None):
    """Softmax attention in float64 over each sequence's visible slots (after the rows' keys were stored)."""
    out, first = [], 0
    group = heads // kv_heads
    for cache, start, r, m in zip(caches, starts, rows, masks):
        end = start + r
        keys, values = cache[layer, :end, 0].double(), cache[layer, :end, 1].double()  # [end, kv, d]
        for i in range(r):
            row = []
            for h in range(heads):
                scores = keys[:, h // group] @ qkv[first + i, h].double() * scale
                scores[~m[window][i, :end]] = float("-inf")
                row.append(torch.softmax(scores, 0) @ values[:, h // group])
            out.append(torch.cat(row))
        first += r
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads,d,window", [(9, 3, 64, None), (4, 1, 256, None), (4, 2, 16, 5),
                                                     (6, 6, 24, None)])
def test_agrees_with_float64_softmax_and_stores_the_rows(heads, kv_heads, d, window):
    starts, rows, length = [0, 13, 40, 7], [3, 1, 9, 5], 64
    caches, qkv, masks = make_case(heads + d, heads, kv_heads, d, starts, rows, length, window)
    before = [c.clone() for c in caches]
    plan = attend.step([0, 3, 4, 13], rows, starts, caches, masks)
    out = attend.attend(qkv, plan, 1, window, heads, kv_heads, 0.3)
    first = 0
    for cache, old, start, r in zip(caches, before, starts, rows):
        stored = qkv[first: first + r, heads:].reshape(r, 2, kv_heads, d)
        assert torch.equal(cache[1, start: start + r], stored)  # layer 1 holds the rows' keys and values
        assert torch.equal(cache[0], old[0]) and torch.equal(cache[1, :start], old[1, :start])  # nothing else moved
        first += r
    want = reference(caches, qkv, masks, starts, rows, 1, heads, kv_heads, 0.3, window)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)  # float32 rounding: about 2e-6 here


def test_a_sequence_gets_the_same_bits_alone_in_a_batch_and_with_a_longer_scan():
    heads, kv_heads, d = 9, 3, 64
    starts, rows = [50, 3, 21], [4, 1, 2]
    caches, qkv, masks = make_case(7, heads, kv_heads, d, starts, rows, 64)
    together = attend.attend(qkv, attend.step([0, 4, 5], rows, starts, caches, masks), 0, None, heads, kv_heads, 0.1)
    first = 0
    for cache, start, r, m in zip(caches, starts, rows, masks):
        rows_qkv = qkv[first: first + r]
        alone = attend.attend(rows_qkv, attend.step([0], [r], [start], [cache], [m]), 0, None, heads, kv_heads, 0.1)
        wide = {None: torch.cat([m[None], torch.zeros(r, 64, dtype=torch.bool)], 1)}  # a scan twice as long
        longer = attend.attend(rows_qkv, attend.step([0], [r], [start], [cache], [wide]), 0, None, heads, kv_heads,
                               0.1)
        assert torch.equal(alone, together[first: first + r]) and torch.equal(longer, alone)
        first += r


def test_threads_do_not_change_the_bits():
    heads, kv_heads, d = 9, 3, 64
    starts, rows = [30, 70, 5, 12, 44, 9], [1, 2, 1, 6, 1, 3]  # 6 sequences: one item per sequence on 2 threads
    caches, qkv, masks = make_case(3, heads, kv_heads, d, starts, rows, 128)
    plan = attend.step([0, 1, 3, 4, 10, 11], rows, starts, caches, masks)
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        try:
            outs.append(attend.attend(qkv, plan, 0, None, heads, kv_heads, 0.125))
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_tree_step_computes_each_token_as_plain_decoding_does(arch):
    """Logits of the root and of every accepted node of a tree step equal, bit for bit, those of one-token steps
    over the same tokens (a branch that is not accepted sits between them in the tree's slots)."""
    hf = tiny_model(arch, vocab_size=64).hf_model
    ids = [(5 + 13 * i) % 64 for i in range(40)]
    tree_runner, plain_runner = FastRunner(hf), FastRunner(hf)
    assert tree_runner.weights.cpu_attention
    for r in (tree_runner, plain_runner):
        r.prefill(ids[:29])
    draft = Draft(torch.tensor([ids[30], 7, ids[31], ids[32]]), torch.tensor([-1, -1, 0, 2]))
    tree = tree_runner.verify(ids[29], draft)  # rows: root, node 0, node 1 (a sibling branch), nodes 2, 3
    tree_runner.commit([0, 2, 3])
    plain = []
    for token in ids[29:33]:
        plain.append(plain_runner.verify(token, Draft.chain([]))[0])
        plain_runner.commit([])
    for row, step in zip((0, 1, 3, 4), plain):
        assert torch.equal(tree[row], step)
    after = [r.verify(ids[33], Draft.chain([]))[0] for r in (tree_runner, plain_runner)]  # caches agree too
    assert torch.equal(after[0], after[1])


def test_torch_attention_is_kept_for_prefill_and_on_request():
    hf = tiny_model("llama", vocab_size=64).hf_model
    x = torch.zeros(1, 4)
    assert attend.usable(x, 16, [1, 64]) and not attend.usable(x, 16, [1, 65])  # prefill chunks: SDPA
    assert not attend.usable(x.double(), 16, [1]) and not attend.usable(x, 12, [1])
    on, off = FastRunner(hf), FastRunner(hf, FastConfig(cpu_attention=False))
    assert on.weights.cpu_attention and not off.weights.cpu_attention
    ids = [(3 + 7 * i) % 64 for i in range(100)]  # 99 prefill rows: one SDPA chunk in both
    outs = []
    for r in (on, off):
        r.prefill(ids[:90])
        outs.append(r.verify(ids[90], Draft.chain(ids[91:96])))
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_batched_runner_gives_a_sequence_its_own_bits():
    hf = tiny_model("qwen2", vocab_size=64).hf_model
    batch = FastBatchRunner(FastRunner(hf), 3)
    slots = [batch.allocate() for _ in range(3)]
    prompts = [[(1 + 5 * i) % 64 for i in range(n)] for n in (20, 7, 33)]
    for slot, p in zip(slots, prompts):
        batch.prefill(slot, p)
    alone = FastRunner(hf)
    alone.prefill(prompts[0])
    want = alone.verify(9, Draft.chain([4, 5, 6]))
    got = batch.verify([(slots[1], 2, Draft.chain([])), (slots[0], 9, Draft.chain([4, 5, 6])),
                        (slots[2], 3, Draft.chain([8]))])
    assert torch.equal(got[1], want)
