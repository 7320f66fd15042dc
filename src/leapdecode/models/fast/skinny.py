"""The skinny matrix product: y = x @ w.T for the few rows of a CPU decode or verify step, in a small C kernel.

A decode step on a CPU streams every weight from memory once per step. torch's general products do more than that
for a handful of rows (MKL and oneDNN copy or re-block the weight, or read it once per row), so a verify step of
five rows cost about 1.3x a one-row step. skinny.c reads each block of 8 weight rows from memory once and applies it
to every row of x while it is in the cache, with AVX2 fused multiply-adds, on as many OpenMP threads as torch uses
(the same OpenMP runtime where torch ships libgomp, as its Linux wheels do). On the 2-core development machine
SmolLM2-135M's whole verify step is faster with it than with torch's layouts at every size up to 48 draft nodes (49
rows; `python scripts/latency_curve.py --compare-kernel`), oneDNN's packed product is faster from 65 rows
(`python scripts/cpu_matmul.py`; BENCHMARKS.md section 0c has both), and it needs no copy of the weights.

Every y[r, j] is summed in one fixed order whatever the number of rows, the block or the thread, so a row's
products do not depend on the rows beside it: a one-row step and a verify step multiply the same token's
activations to the same bits (the attention and the rest are torch's and may still round differently).

The kernel is compiled the first time it is needed, with the machine's C compiler (`cc`, or $CC), into the model
cache (`$LEAPDECODE_CACHE/kernels`, else ~/.cache/leapdecode/kernels), and checked against torch on random data
before use; a compiler without OpenMP gets a one-thread build. Where it cannot be (no compiler, not Linux on x86-64,
a CPU without AVX2 and FMA, a failed build or check, or LEAPDECODE_CPU_KERNEL=0), `unavailable_reason()` says why
and the fast runner falls back to torch's layouts.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("skinny.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")  # no -ffast-math: the order of sums is fixed
OPENMP = "-fopenmp"  # tried first; without it the kernel runs on one thread
ENV_SWITCH = "LEAPDECODE_CPU_KERNEL"
MAX_ROWS = 64  # above this, oneDNN's packed product is faster (BENCHMARKS.md section 0c); prefill goes there


def available() -> bool:
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """None when the kernel is built, loaded and checked; else why not, in words."""
    return _load()[1]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight.T -> [R, N] for float32 CPU tensors, weight [N, K] contiguous. Needs available()."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the skinny CPU kernel is unavailable: {unavailable_reason()}")
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
    return f"skinny-{_digest()[:8]}" if available() else "torch"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return None, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernel is written for x86-64 (AVX2), this machine is {platform.machine()}"
    flags = _cpu_flags()
    if flags is None:  # running AVX2 code on a CPU without it would kill the process, so do not guess
        return None, "cannot read this CPU's features from /proc/cpuinfo (the kernel needs Linux on x86-64)"
    if not {"avx2", "fma"} <= flags:
        return None, "this CPU lacks AVX2 or FMA"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (install gcc, or set CC)"
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building or loading {SOURCE.name} failed: {str(e).strip()[:300]}"
    lib.leap_skinny.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.leap_skinny.restype = None
    problem = _self_check(lib)
    return (None, problem) if problem else (lib, None)


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def _digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes() + " ".join((*FLAGS, OPENMP)).encode()).hexdigest()


def _build(compiler: str) -> Path:
    """Compile skinny.c once per source, flags and compiler into the cache; concurrent builds replace atomically."""
    from leapdecode.models.load import cache_root

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256((_digest() + compiler + version).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"skinny-{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so.tmp", delete=False) as f:
        tmp = f.name
    try:
        for extra in ([OPENMP], []):  # a compiler without an OpenMP runtime builds the one-thread kernel
            done = subprocess.run([compiler, *FLAGS, *extra, "-o", tmp, str(SOURCE)], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"{Path(compiler).name} exited with {done.returncode}: {done.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Run the kernel on random shapes with both block kinds and a k tail; compare with torch."""
    gen = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 64, 24), (5, 37, 19), (9, 128, 8)):
        x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
        out = torch.empty(rows, n)
        lib.leap_skinny(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, k, n, 2)
        if not torch.allclose(out, F.linear(x, w), rtol=1e-4, atol=1e-4):
            return f"the built kernel disagrees with torch on a [{rows}, {k}] x [{n}, {k}] product"
    return None
