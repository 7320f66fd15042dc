"""The fast batched runner (models/fast/batch.py): every sequence's logits are those it gets alone.

Tiny random-weight models in float32 (Llama, Qwen2, Gemma 3 with sliding-window layers): sequences of different
lengths verify chains, trees and empty drafts in one pass; each one's logits must equal a single-sequence
FastRunner's on the same input, through chunked prefill, cache growth, gathered tree commits and releases.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from leapdecode.drafters.base import Draft
from leapdecode.models.fast import FastConfig, FastRunner, attend, kernels
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.models.fast.forward import PaddedBatch
from leapdecode.serve.batch_runner import BatchRunner
from leapdecode.serve.engine import ServeConfig, batch_runner
from leapdecode.serve.scheduler import time_step

VOCAB = 64


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(VOCAB, (n,), generator=g).tolist() for n in (9, 17, 30)]


@pytest.mark.parametrize("attention", ["attend.c", "padded", "per-sequence"])
def test_batched_steps_match_single_sequence_runner(tiny, one_thread, attention, monkeypatch):
    # without attend.c, the GPU's ways: one SDPA call per layer over the sequences' padded caches (PaddedBatch, the
    # default off the CPU), or one call per sequence and layer
    if attention == "attend.c" and kernels.unavailable_reason():
        pytest.skip(f"the CPU kernels did not build: {kernels.unavailable_reason()}")
    used = {"attend.c": 0, "padded": 0}
    gather, step = PaddedBatch.gather, attend.step
    monkeypatch.setattr(PaddedBatch, "gather", staticmethod(
        lambda *a, **k: used.__setitem__("padded", used["padded"] + 1) or gather(*a, **k)))
    monkeypatch.setattr(attend, "step", lambda *a, **k: used.__setitem__("attend.c", used["attend.c"] + 1) or
                        step(*a, **k))
    config = FastConfig(cpu_attention=attention == "attend.c")
    shared = FastRunner(tiny.hf_model, config)
    shared.weights.padded_attention = attention == "padded"
    batch = FastBatchRunner(shared, max_batch=4, capacity=8)  # capacity 8: every cache grows
    singles = [FastRunner(tiny.hf_model, config) for _ in prompts()]
    slots = [batch.allocate() for _ in prompts()]
    for prompt, single, slot in zip(prompts(), singles, slots):
        single.prefill(prompt[:-1])
        for i in range(0, len(prompt) - 1, 5):  # chunked prefill
            batch.prefill(slot, prompt[:-1][i: i + 5])
    roots = [p[-1] for p in prompts()]
    steps = [  # per step: a draft and an accepted path for each of the three sequences
        ([Draft.chain([1, 2, 3]), Draft.tree([4, 5, 6, 7], [-1, -1, 0, 1]), Draft.empty()], [[0, 1], [1, 3], []]),
        ([Draft.empty(), Draft.chain([8]), Draft.tree([9, 10, 11], [-1, -1, -1])], [[], [0], [2]]),
    ]
    for drafts, paths in steps:
        got = batch.verify(list(zip(slots, roots, drafts)))
        for k in range(3):
            assert got[k].shape == (1 + drafts[k].n, tiny.hf_model.config.vocab_size)
            torch.testing.assert_close(got[k], singles[k].verify(roots[k], drafts[k]), rtol=1e-4, atol=1e-4)
            singles[k].commit(paths[k])
            batch.commit(slots[k], paths[k])
            roots[k] = 13 + k
    assert [s.length for s in slots] == [s.cache_len for s in singles]
    batch.release(slots[0])
    assert batch.free_slots == 2 and batch.span(slots[1:]) == 2
    got = batch.verify([(slots[2], 6, Draft.chain([9, 3])), (slots[1], 5, Draft.empty())])  # any order
    torch.testing.assert_close(got[0], singles[2].verify(6, Draft.chain([9, 3])), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], singles[1].verify(5, Draft.empty()), rtol=1e-4, atol=1e-4)
    assert (used["attend.c"] > 0, used["padded"] > 0) == (attention == "attend.c", attention == "padded")


def with_aux(tokens: list[int], parents: list[int]) -> Draft:
    """A draft with a Lookahead-style aux branch: 3 tokens at offsets 1, 2, 3 seeing the root and each other
    causally (not the nodes)."""
    n, m = len(tokens), 3
    mask = torch.zeros(m, n + 1 + m, dtype=torch.bool)
    mask[:, 0] = True
    mask[:, n + 1:] = torch.ones(m, m, dtype=torch.bool).tril()
    return Draft(torch.tensor(tokens), torch.tensor(parents), aux_tokens=torch.tensor([21, 22, 23]),
                 aux_positions=torch.tensor([1, 2, 3]), aux_mask=mask)


def test_aux_rows_and_a_failed_pass(tiny, one_thread):
    # aux rows come back after the nodes' rows for each sequence; a pass that fails (one sequence past the model's
    # positions) leaves every slot as it was, and the next pass still matches the single-sequence runner
    batch = FastBatchRunner(FastRunner(tiny.hf_model), max_batch=2)
    singles = [FastRunner(tiny.hf_model) for _ in range(2)]
    slots = [batch.allocate() for _ in range(2)]
    for prompt, single, slot in zip(prompts()[:2], singles, slots):
        single.prefill(prompt)
        batch.prefill(slot, prompt)
    drafts = [with_aux([1, 2], [-1, 0]), with_aux([3, 4, 5], [-1, -1, 1])]
    got = batch.verify(list(zip(slots, [7, 8], drafts)))
    for k in range(2):
        assert got[k].shape[0] == 1 + drafts[k].n + 3
        torch.testing.assert_close(got[k], singles[k].verify([7, 8][k], drafts[k]), rtol=1e-4, atol=1e-4)
        singles[k].commit([0])
        batch.commit(slots[k], [0])
    far = tiny.hf_model.config.max_position_embeddings  # a chain reaching past the last position
    with pytest.raises(ValueError, match="positions"):
        batch.verify([(slots[0], 9, Draft.chain([1])), (slots[1], 9, Draft.chain([2] * far))])
    assert [s.pending for s in slots] == [0, 0]
    got = batch.verify([(slots[0], 9, Draft.chain([1])), (slots[1], 9, Draft.empty())])
    torch.testing.assert_close(got[0], singles[0].verify(9, Draft.chain([1])), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], singles[1].verify(9, Draft.empty()), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="verify twice"):
        batch.verify([(slots[0], 9, Draft.empty())])
    batch.commit(slots[0], [])
    with pytest.raises(RuntimeError, match="verify twice"):  # one slot twice in one batch
        batch.verify([(slots[0], 9, Draft.empty()), (slots[0], 9, Draft.empty())])


def test_protocol_errors(tiny_models, one_thread):
    model = tiny_models["llama"]
    batch = FastBatchRunner(FastRunner(model.hf_model), max_batch=1)
    slot = batch.allocate()
    with pytest.raises(RuntimeError, match="slots are in use"):
        batch.allocate()
    batch.prefill(slot, [1, 2, 3])
    with pytest.raises(RuntimeError, match="commit without verify"):
        batch.commit(slot, [])
    batch.verify([(slot, 4, Draft.chain([5]))])
    with pytest.raises(RuntimeError, match="verify twice"):
        batch.verify([(slot, 4, Draft.chain([5]))])
    with pytest.raises(RuntimeError, match="prefill after verify"):
        batch.prefill(slot, [1])
    batch.commit(slot, [0])
    assert slot.length == 5
    with pytest.raises(ValueError, match="positions"):
        batch.prefill(slot, [1] * model.hf_model.config.max_position_embeddings)
    last = model.hf_model.config.max_position_embeddings
    batch.prefill(slot, [1] * (last - 7))  # the root sits at position last - 2
    rows = batch.verify([(slot, 4, with_aux([5], [-1]))])[0]  # aux offsets 1..3 would pass the last position
    assert rows.shape[0] == 2  # the unverified aux branch was dropped, the root and node were scored
    batch.release(slot)
    with pytest.raises(ValueError, match="not held"):
        batch.release(slot)
    with pytest.raises(ValueError, match="max_batch"):
        FastBatchRunner(FastRunner(model.hf_model), max_batch=0)
    scratch = batch.allocate()
    assert time_step(batch, [scratch], 4) > 0 and scratch.length == 1 and not scratch.pending  # root kept
    batch.release(scratch)


def test_the_server_batches_through_the_fast_forward_where_supported(tiny_models):
    model = dataclasses.replace(tiny_models["qwen2"], _fast_runner=None)  # a copy: the shared model stays as it is
    assert isinstance(batch_runner(model, "auto", 2), FastBatchRunner)  # a supported architecture, on a CPU
    assert isinstance(batch_runner(model, "fast", 2), FastBatchRunner)
    assert isinstance(batch_runner(model, "hf", 2), BatchRunner)
    with pytest.raises(ValueError, match="unknown runner 'turbo'"):
        ServeConfig(served_name="tiny", runner="turbo")


def test_padded_attention_is_for_devices_and_batches_of_like_scans():
    from types import SimpleNamespace

    from leapdecode.models.fast.forward import PAD_WASTE, Segment

    x = torch.zeros(1, 4)  # a CPU tensor
    like = [Segment(None, 0, 1, None, None, length) for length in (64, 64, 128)]
    default, forced = SimpleNamespace(padded_attention=None), SimpleNamespace(padded_attention=True)
    assert not PaddedBatch.pays(default, x, like)  # None: off the CPU only
    assert PaddedBatch.pays(forced, x, like)
    assert not PaddedBatch.pays(SimpleNamespace(padded_attention=False), x, like)
    # one long scan among many short ones: padding every sequence to it would scan over PAD_WASTE times the slots
    unlike = [Segment(None, 0, 1, None, None, 4096)] + [Segment(None, 0, 1, None, None, 128)] * 15
    assert 16 * 4096 > PAD_WASTE * (4096 + 15 * 128) and not PaddedBatch.pays(forced, x, unlike)
