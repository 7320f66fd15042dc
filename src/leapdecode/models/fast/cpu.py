"""CPU weight layouts: the fast runner's matrix products on a CPU, in the layouts the CPU reads fastest.

On a CPU a decode step streams every weight from memory, so a step costs what reading the weights costs, and that
depends on the layout and on the number of rows (R) in the product. `python scripts/cpu_matmul.py` times 30 layers
of SmolLM2-135M's fused gate/up [3072, 576] float32 (212 MB) in each layout (BENCHMARKS.md section 0c has the
table, with machine and date):
- the skinny kernel (skinny.py): the weight as stored, read once for all rows, each row's result independent of
  the others; the whole step is faster with it up to 49 rows, oneDNN from 65. Used for steps of up to
  skinny.MAX_ROWS rows wherever it builds;
- oneDNN's linear with the weight pre-packed into its blocked layout (torch's `mkldnn._linear_pointwise`, the op
  torch.compile's CPU freezing pass uses): several rows, and every row count above the kernel's (prefill);
- a stored transposed copy [in, out] for one row (a matrix-vector product), where the kernel is unavailable;
- W @ x^T on the weight as stored, where oneDNN cannot pack the dtype.

The price is memory: one more copy of the projection weights with the kernel (the packed one), two without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leapdecode.models.fast import skinny

PACK_ROWS = 64  # the row count oneDNN tunes the packed layout for; any row count runs on it


@dataclass(frozen=True)
class CpuLinear:
    """One projection W [out, in] in its CPU layouts."""

    transposed: torch.Tensor | None  # [in, out] contiguous: one-row products without the kernel
    packed: torch.Tensor | None  # oneDNN's blocked layout of W (an mkldnn tensor), or None: several-row products
    kernel: bool = False  # up to skinny.MAX_ROWS rows through the skinny kernel, on W as stored

    @staticmethod
    def of(weight: torch.Tensor, kernel: bool = True) -> CpuLinear:
        """The layouts of `weight`; kernel=False keeps to torch's products even where the skinny kernel builds."""
        kernel = kernel and skinny.fits(weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if onednn_packs(weight.dtype) else None
        return CpuLinear(None if kernel else weight.t().contiguous(), packed, kernel)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, layouts: CpuLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """x [R, in] @ weight.T (+ bias) -> [R, out], through the layout that is fastest for R rows (see above)."""
    rows = x.shape[0]
    if layouts.kernel and rows <= skinny.MAX_ROWS:
        out = skinny.linear(x, weight)
    elif rows == 1 and layouts.transposed is not None:
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
