"""The skinny matrix product: y = x @ w.T for the few rows of a CPU decode or verify step, in a small C kernel.

A decode step on a CPU streams every weight from memory once per step. torch's general products do more than that
for a handful of rows (MKL and oneDNN copy or re-block the weight, or read it once per row), so a verify step of
five rows cost about 1.3x a one-row step. skinny.c reads each block of 3 weight rows from memory once, prefetching
the block two ahead into L2, and applies it to every row of x while it is in the cache, 4 rows of x at a time with
AVX2 fused multiply-adds (12 sums in registers, so one weight load serves 4 rows), on as many OpenMP threads as torch
uses (the same OpenMP runtime where torch ships libgomp, as its Linux wheels do). The product is faster than
torch's layouts up to about 33 rows and level with oneDNN's packed product from there to 65
(`python scripts/cpu_matmul.py`; BENCHMARKS.md sections 0c and 0f), and it needs no copy of the weights.

Every y[r, j] is summed in one fixed order whatever the number of rows, the block or the thread, so a row's
products do not depend on the rows beside it: a one-row step and a verify step multiply the same token's
activations to the same bits. With attend.c for attention, the whole step does (attend.py).

It is built, loaded and checked together with attend.c by kernels.py; where it cannot be, `unavailable_reason()`
says why and the fast runner falls back to torch's layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leapdecode.models.fast import kernels

MAX_ROWS = 64  # above this, oneDNN's packed product is faster (BENCHMARKS.md section 0c); prefill goes there


def available() -> bool:
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """None when the kernel is built, loaded and checked; else why not, in words."""
    return kernels.unavailable_reason()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight.T -> [R, N] for float32 CPU tensors, weight [N, K] contiguous. Needs available()."""
    lib = kernels.library()
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"skinny.linear needs x [R, K] and weight [N, K]; got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    x = x.contiguous()
    rows, k = x.shape
    n = weight.shape[0]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape[1] != k \
            or not weight.is_contiguous() or x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"skinny.linear needs float32 CPU x [R, K] and contiguous weight [N, K]; got x "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty(rows, n, dtype=torch.float32)  # [R, N]
    lib.leap_skinny(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, k, n, torch.get_num_threads())
    return out


def fits(weight: torch.Tensor) -> bool:
    """Whether products with this weight can run on the kernel (it is available, float32, CPU, contiguous)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2 \
        and weight.is_contiguous() and available()


def tag() -> str:
    """A short name of the CPU product path for cache keys: 'skinny-<source hash>' or 'torch'."""
    return kernels.tag()


def self_check(lib) -> str | None:
    """Run the kernel on random shapes with full and partial tiles and blocks and a k tail; compare with torch."""
    gen = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 64, 24), (5, 37, 19), (9, 128, 8), (17, 40, 7)):
        x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
        out = torch.empty(rows, n)
        lib.leap_skinny(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, k, n, 2)
        if not torch.allclose(out, F.linear(x, w), rtol=1e-4, atol=1e-4):
            return f"the built kernel disagrees with torch on a [{rows}, {k}] x [{n}, {k}] product"
    return None
