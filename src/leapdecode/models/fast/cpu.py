"""CPU weight layouts: the fast runner's matrix products on a CPU, in the layouts the CPU reads fastest.

On a CPU a decode step streams every weight from memory, so a step costs what reading the weights costs, and that
depends on the layout and on the number of rows (R) in the product. `python scripts/cpu_matmul.py` (2026-11-29,
the 2-core development machine, AMD EPYC with AVX2, torch 2.13) times 30 layers of SmolLM2-135M's fused gate/up
[3072, 576] (212 MB), ms per pass:

| rows                                   |    1 |    2 |    5 |    9 |   17 |   33 |
|----------------------------------------|-----:|-----:|-----:|-----:|-----:|-----:|
| x @ W^T, W^T stored [in, out] (MKL)    | 15.1 | 26.4 | 84.9 | 84.0 | 85.9 | 120.9 |
| W @ x^T, W stored [out, in] (MKL)      | 26.5 | 20.1 | 24.3 | 37.5 | 47.3 | 69.1 |
| oneDNN, W packed once for 64 rows      | 17.7 | 20.5 | 21.8 | 25.8 | 36.4 | 52.1 |

So one row reads a stored transposed copy (a matrix-vector product, the plain-decoding step), and several rows go
through oneDNN's linear with the weight pre-packed into its blocked layout (torch's own `mkldnn._linear_pointwise`,
the op torch.compile's CPU freezing pass uses). Verifying a few draft tokens then costs little more than decoding
one: the condition for speculation to pay on a CPU. Where oneDNN cannot pack the dtype, several rows use W @ x^T.
The price is memory: two more copies of the projection weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACK_ROWS = 64  # the row count oneDNN tunes the packed layout for; any row count runs on it


@dataclass(frozen=True)
class CpuLinear:
    """One projection W [out, in] in its CPU layouts."""

    transposed: torch.Tensor  # [in, out] contiguous: one-row products
    packed: torch.Tensor | None  # oneDNN's blocked layout of W (an mkldnn tensor), or None: several-row products

    @staticmethod
    def of(weight: torch.Tensor) -> CpuLinear:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if onednn_packs(weight.dtype) else None
        return CpuLinear(weight.t().contiguous(), packed)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, layouts: CpuLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """x [R, in] @ weight.T (+ bias) -> [R, out], through the layout that is fastest for R rows (see above)."""
    if x.shape[0] == 1:
        out = x @ layouts.transposed
    elif layouts.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layouts.packed, bias, "none", [], "")
    else:
        out = (weight @ x.t()).t()
    return out if bias is None else out + bias


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and runs oneDNN linears of `dtype` on this CPU, giving F.linear's result."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight, x = torch.randn(24, 16), torch.randn(3, 16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, weight), rtol=1e-4, atol=1e-5))
    except (RuntimeError, AttributeError):  # an op missing from this build, or not for this CPU
        return False
