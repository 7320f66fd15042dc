"""The skinny CPU kernel (models/fast/skinny.py): it builds where a compiler and AVX2 exist, agrees with torch,
gives every row the same bits whatever rows and threads share its product, refuses bad input, can be turned off,
and the fast runner with it computes what the runner without it does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from leapdecode.drafters.base import Draft
from leapdecode.models.fast import FastConfig, FastRunner
from leapdecode.models.fast import kernels, skinny
from leapdecode.models.fast.cpu import CpuLinear, cpu_linear
from leapdecode.models.tiny import tiny_model

CANNOT_BUILD = ("no C compiler", "lacks AVX2", "written for x86-64", "cannot read this CPU", "turned off")


@pytest.fixture(scope="module")
def kernel():
    reason = skinny.unavailable_reason()
    if reason is not None and any(r in reason for r in CANNOT_BUILD):
        pytest.skip(f"the skinny kernel cannot exist here: {reason}")
    assert reason is None, f"the kernel should build on this machine but: {reason}"
    return skinny


@pytest.mark.parametrize("rows,k,n", [(1, 576, 3072), (5, 576, 960), (9, 1536, 576), (3, 37, 19), (64, 24, 100),
                                      (2, 7, 5), (17, 64, 8)])
def test_agrees_with_torch(kernel, rows, k, n):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    out = kernel.linear(x, w)
    exact = (x.double() @ w.double().t())
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_strided_input_is_made_contiguous(kernel):
    gen = torch.Generator().manual_seed(4)
    wide, w = torch.randn(5, 2 * 40, generator=gen), torch.randn(13, 40, generator=gen)
    x = wide[:, ::2]  # [5, 40], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(kernel.linear(x, w), kernel.linear(x.contiguous(), w))
    assert torch.equal(kernel.linear(x.t().contiguous().t(), w), kernel.linear(x.contiguous(), w))


def test_rows_do_not_depend_on_their_neighbours(kernel):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(33, 100, generator=gen), torch.randn(45, 100, generator=gen)  # k and n tails both
    together = kernel.linear(x, w)
    alone = torch.cat([kernel.linear(x[i: i + 1], w) for i in range(33)])
    assert torch.equal(together, alone)
    some = [3, 0, 31, 7, 7]
    assert torch.equal(kernel.linear(x[some], w), together[some])
    for rows in range(1, 21):  # every way of spreading rows over tiles (5 = 3 + 2, 9 = 3 + 3 + 3, ...)
        assert torch.equal(kernel.linear(x[:rows], w), together[:rows]), rows


def test_threads_do_not_change_the_bits(kernel):
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 576, generator=gen), torch.randn(1000, 576, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.linear(x, w)
        torch.set_num_threads(2)
        two = kernel.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_input_is_refused_with_its_shape_and_dtype(kernel):
    with pytest.raises(ValueError, match="float64"):
        kernel.linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\(4, 9\)"):
        kernel.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="contiguous"):
        kernel.linear(torch.randn(2, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match=r"\(2, 3, 8\)"):
        kernel.linear(torch.randn(2, 3, 8), torch.randn(4, 8))


def test_cpu_linear_routes_rows_to_the_kernel_and_beyond(kernel):
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    with_kernel, without = CpuLinear.of(w), CpuLinear.of(w, kernel=False)
    assert with_kernel.kernel and with_kernel.transposed is None and not without.kernel
    for rows in (1, 4, kernel.MAX_ROWS, kernel.MAX_ROWS + 1, 200):  # the last two go to oneDNN (or W @ x^T)
        x = torch.randn(rows, 24, generator=gen)
        ref = torch.nn.functional.linear(x, w, b)
        for layouts in (with_kernel, without):
            assert torch.allclose(cpu_linear(x, w, layouts, b), ref, rtol=1e-4, atol=1e-4)
    x = torch.randn(4, 24, generator=gen)
    assert torch.equal(cpu_linear(x, w, with_kernel, None), kernel.linear(x, w))


def test_switch_turns_it_off():
    env = dict(os.environ, LEAPDECODE_CPU_KERNEL="0")
    code = "from leapdecode.models.fast import skinny; print(skinny.unavailable_reason()); print(skinny.tag())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["turned off by LEAPDECODE_CPU_KERNEL=0", "torch"]


def test_a_compiler_without_openmp_builds_the_one_thread_kernel(kernel, tmp_path):
    """A compiler that refuses -fopenmp (as clang without libomp does) still gives a working kernel."""
    real = kernels.compiler()
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, CC=str(wrapper), LEAPDECODE_CACHE=str(tmp_path / "cache"))
    code = ("import torch; from leapdecode.models.fast import skinny; print(skinny.unavailable_reason()); "
            "x, w = torch.randn(3, 20), torch.randn(9, 20); "
            "print(torch.allclose(skinny.linear(x, w), x @ w.t(), atol=1e-5))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["None", "True"]
    assert len(list((tmp_path / "cache" / "kernels").glob("skinny-*.so"))) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_fast_runner_with_the_kernel_matches_torch_products(kernel, arch):
    """Same model, the kernel vs torch's layouts: the logits of prefill, a chain and the next step agree."""
    hf = tiny_model(arch, vocab_size=64).hf_model
    runners = [FastRunner(hf, FastConfig(cpu_kernel=True)), FastRunner(hf, FastConfig(cpu_kernel=False))]
    assert runners[0].weights.lm_head_cpu.kernel and not runners[1].weights.lm_head_cpu.kernel
    ids = [(5 + 13 * i) % 64 for i in range(40)]
    outs = []
    for r in runners:
        r.reset()
        r.prefill(ids[:29])
        first = r.verify(ids[29], Draft.chain(ids[30:34]))  # [5, vocab]
        r.commit([0, 1])
        outs.append((first, r.verify(ids[32], Draft.chain([]))))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
