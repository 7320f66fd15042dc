"""Time the CPU matrix-product layouts of models/fast/cpu.py: ms per pass over a stack of projections, by rows.

    .venv/bin/python scripts/cpu_matmul.py [--out 3072 --in 576 --layers 30 --threads 2]

The default stack is 30 layers of SmolLM2-135M's fused gate/up projection [3072, 576] in float32 (212 MB, more than
the caches hold, so every pass streams the weights from memory as a decode step does). Each cell is the best of
`--repeats` passes. The layouts:
- `x @ W^T stored`: a contiguous transposed copy [in, out] (what the fast runner uses for one row);
- `W @ x^T`: the weight as transformers stores it [out, in];
- `oneDNN packed`: torch.ops.mkldnn._linear_pointwise on a weight packed once (cpu.CpuLinear, several rows);
- `skinny kernel`: leapdecode's C kernel on the weight as stored (models/fast/skinny.py), where it builds.
Each round times every layout once, round-robin, so a busy moment of the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import time

import torch

from leapdecode.models.fast import skinny
from leapdecode.models.fast.cpu import CpuLinear, onednn_packs


def elapsed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=int, default=3072)
    ap.add_argument("--in", dest="inp", type=int, default=576)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", default="1,2,5,9,17,33,65,129")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(args.out, args.inp) for _ in range(args.layers)]  # [out, in] each
    layouts = [CpuLinear.of(w, kernel=False) for w in weights]
    mb = args.layers * args.out * args.inp * 4 / 1e6
    kernel = skinny.unavailable_reason()
    print(f"{args.layers} x [{args.out}, {args.inp}] float32 ({mb:.0f} MB), {args.threads} threads, torch "
          f"{torch.__version__}, oneDNN packing {'available' if onednn_packs(torch.float32) else 'unavailable'}, "
          f"skinny kernel {'available' if kernel is None else 'unavailable: ' + kernel}; best of {args.repeats}")
    products = {
        "x @ W^T stored": lambda x: [x @ c.transposed for c in layouts],
        "W @ x^T": lambda x: [(w @ x.t()).t() for w in weights],
    }
    if layouts[0].packed is not None:
        products["oneDNN packed"] = lambda x: [torch.ops.mkldnn._linear_pointwise(x, c.packed, None, "none", [], "")
                                               for c in layouts]
    if kernel is None:
        products["skinny kernel"] = lambda x: [skinny.linear(x, w) for w in weights]
    rows = [int(r) for r in args.rows.split(",")]
    table = {name: [] for name in products}
    with torch.inference_mode():
        for r in rows:
            x = torch.randn(r, args.inp)
            for fn in products.values():
                fn(x)  # warm-up
            times = {name: [] for name in products}
            for _ in range(args.repeats):
                for name, fn in products.items():
                    times[name].append(elapsed_ms(lambda: fn(x)))
            for name in products:
                table[name].append(min(times[name]))
    print("| layout | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in cells) + " |")


if __name__ == "__main__":
    main()
