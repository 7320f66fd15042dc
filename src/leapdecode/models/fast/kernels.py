"""leapdecode's C kernels for CPU steps: building, loading and checking them.

Two small C files make one library: skinny.c, the matrix product for the few rows of a decode or verify step
(skinny.py), and attend.c, attention for every sequence of a step in one call (attend.py). Both use AVX2 and FMA,
and OpenMP threads as many as torch uses (the same OpenMP runtime where torch ships libgomp, as its Linux wheels do).

The library is compiled the first time it is needed, with the machine's C compiler (`cc`, or $CC), into the model
cache (`$LEAPDECODE_CACHE/kernels`, else ~/.cache/leapdecode/kernels), and checked against torch on random data
before use; a compiler without OpenMP gets a one-thread build. Where it cannot be (no compiler, not Linux on x86-64,
a CPU without AVX2 and FMA, a failed build or check, or LEAPDECODE_CPU_KERNEL=0), `unavailable_reason()` says why
and the fast runner keeps to torch's products and attention.
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

SOURCES = (Path(__file__).with_name("skinny.c"), Path(__file__).with_name("attend.c"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")  # no -ffast-math: the order of sums is fixed
OPENMP = "-fopenmp"  # tried first; without it the kernels run on one thread
ENV_SWITCH = "LEAPDECODE_CPU_KERNEL"


def library() -> ctypes.CDLL:
    """The loaded library; raises RuntimeError saying why when it is unavailable."""
    lib, reason = load()
    if lib is None:
        raise RuntimeError(f"leapdecode's CPU kernels are unavailable: {reason}")
    return lib


def unavailable_reason() -> str | None:
    """None when the kernels are built, loaded and checked; else why not, in words."""
    return load()[1]


def tag() -> str:
    """A short name of the CPU kernels for cache keys: 'skinny-<source hash>' or 'torch' (without them)."""
    return f"skinny-{digest()[:8]}" if unavailable_reason() is None else "torch"


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return None, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels are written for x86-64 (AVX2), this machine is {platform.machine()}"
    flags = cpu_flags()
    if flags is None:  # running AVX2 code on a CPU without it would kill the process, so do not guess
        return None, "cannot read this CPU's features from /proc/cpuinfo (the kernels need Linux on x86-64)"
    if not {"avx2", "fma"} <= flags:
        return None, "this CPU lacks AVX2 or FMA"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (install gcc, or set CC)"
    try:
        path = build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building or loading {', '.join(s.name for s in SOURCES)} failed: {str(e).strip()[:300]}"
    lib.leap_skinny.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.leap_skinny.restype = None
    lib.leap_attend.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int64] \
        + [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    lib.leap_attend.restype = None
    from leapdecode.models.fast import attend, skinny  # their checks run the freshly loaded library

    problem = skinny.self_check(lib) or attend.self_check(lib)
    return (None, problem) if problem else (lib, None)


def cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def digest() -> str:
    return hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join((*FLAGS, OPENMP)).encode()).hexdigest()


def build(cc: str) -> Path:
    """Compile the sources once per source, flags and compiler into the cache; concurrent builds replace
    atomically."""
    from leapdecode.models.load import cache_root

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256((digest() + cc + version).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"skinny-{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so.tmp", delete=False) as f:
        tmp = f.name
    try:
        for extra in ([OPENMP], []):  # a compiler without an OpenMP runtime builds the one-thread kernels
            done = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"{Path(cc).name} exited with {done.returncode}: {done.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
