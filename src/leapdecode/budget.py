"""Hardware-aware tree budget: how many draft nodes to verify per step on *this* device.

A bigger draft tree accepts more tokens per step, but every node costs target time, and how much depends on the
device: on a GPU verifying 64 nodes costs about what 1 costs (the pass is memory-bound), on a two-core CPU a 64-node
pass can cost several single steps. So the budget is chosen from measurements, not fixed:

- `measure_latency(runner)` times one step (verify of root + k nodes, then commit of nothing) after a prefill of a
  realistic context, for several sizes k, and keeps the median. Sizes are measured round-robin (every size once per
  round) so a load change on a shared machine hits all sizes alike instead of skewing one of them.
- `cached_latency_curve(model)` does that once per (model, device, dtype, torch version, threads) and keeps the curve
  as JSON under the leapdecode cache directory, so later start-ups read it in milliseconds.
- `choose_budget(curve, expected_tokens)` picks the size b maximising expected_tokens(b) / latency(b): expected
  tokens per second, with latency interpolated linearly between measured sizes. expected_tokens comes from the
  drafter's own acceptance estimates (for a static tree: 1 bonus + the summed probabilities that each kept node is
  on the accepted path).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leapdecode.drafters.base import Draft

DEFAULT_SIZES = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96)  # draft nodes; 0 is a plain decoding step
CURVE_FORMAT = 1  # bump when the JSON layout or the measuring method changes: old files are then re-measured


@dataclass(frozen=True)
class LatencyCurve:
    """Seconds of one target step (verify + commit) as a function of the number of draft nodes."""

    sizes: tuple[int, ...]  # increasing draft sizes, 0 = root only
    seconds: tuple[float, ...]  # [len(sizes)] median step time at each size
    key: str = ""  # what was measured: model, device, dtype, torch version, threads

    def __post_init__(self) -> None:
        if len(self.sizes) < 1 or len(self.sizes) != len(self.seconds):
            raise ValueError(f"sizes and seconds must be non-empty and of equal length, got {len(self.sizes)} "
                             f"and {len(self.seconds)}")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])) or self.sizes[0] < 0:
            raise ValueError(f"sizes must be increasing and >= 0, got {self.sizes}")
        if any(not (s > 0) or math.isinf(s) for s in self.seconds):
            raise ValueError(f"seconds must be positive and finite, got {self.seconds}")

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def latency(self, nodes: float) -> float:
        """Step seconds at `nodes` draft nodes: linear between measured sizes, flat below the first, and continued
        along the last segment's slope above the last (a step never gets cheaper with more nodes there)."""
        sizes, secs = self.sizes, self.seconds
        if nodes <= sizes[0]:
            return secs[0]
        for i in range(1, len(sizes)):
            if nodes <= sizes[i]:
                frac = (nodes - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
                return secs[i - 1] + frac * (secs[i] - secs[i - 1])
        if len(sizes) == 1:
            return secs[0]
        slope = max(0.0, (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2]))
        return secs[-1] + slope * (nodes - sizes[-1])

    def as_ms(self) -> dict[str, float]:
        """{"nodes": milliseconds} for stats and reports."""
        return {str(s): round(1000.0 * t, 3) for s, t in zip(self.sizes, self.seconds)}

    def to_json(self) -> dict[str, Any]:
        return {"format": CURVE_FORMAT, "key": self.key, "sizes": list(self.sizes), "seconds": list(self.seconds)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> LatencyCurve:
        if data.get("format") != CURVE_FORMAT:
            raise ValueError(f"latency curve format {data.get('format')!r}, expected {CURVE_FORMAT}")
        return LatencyCurve(tuple(int(s) for s in data["sizes"]), tuple(float(t) for t in data["seconds"]),
                            str(data.get("key", "")))


def choose_budget(curve: LatencyCurve, expected_tokens: Callable[[int], float], max_budget: int | None = None,
                  overhead_seconds: Callable[[int], float] | None = None) -> int:
    """The draft size b in [0, max_budget] that maximises expected_tokens(b) / (latency(b) + overhead(b)).

    `expected_tokens(b)`: tokens a step emits on average with a b-node draft (1 for b = 0: the bonus alone).
    `max_budget` defaults to the curve's largest measured size (no extrapolation far beyond the data).
    `overhead_seconds(b)`: the drafter's own time per step at size b, if it matters. Ties go to the smaller b.
    """
    top = curve.max_size if max_budget is None else max_budget
    if top < 0:
        raise ValueError(f"max_budget must be >= 0, got {max_budget}")
    best, best_rate = 0, -1.0
    for b in range(top + 1):
        seconds = curve.latency(b) + (overhead_seconds(b) if overhead_seconds else 0.0)
        rate = expected_tokens(b) / seconds
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = b, rate
    return best


def measure_latency(runner: Any, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 3, context_len: int = 256,
                    warmup: int = 1, key: str = "") -> LatencyCurve:
    """Median seconds of verify(root, k-node chain) + commit([]) after prefilling `context_len` tokens, per size k.

    Each round times every size once (round-robin); `warmup` rounds are discarded, then `repeats` rounds are kept.
    One prefill serves all rounds: each commit keeps the root, so the context grows by one token per timing (a few
    dozen over a 256-token context, which changes the cost by a few percent at most). The tokens are arbitrary ids:
    cost does not depend on them, and a chain stands for any tree of the same size (same pass, another mask).
    The medians are then made non-decreasing in size (see `monotone`), since noise on a shared machine can
    otherwise make a bigger draft look cheaper than a smaller one.
    """
    sizes = tuple(int(s) for s in sizes)
    if repeats < 1 or warmup < 0 or context_len < 2:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and context_len >= 2, got {repeats}, {warmup}, "
                         f"{context_len}")
    vocab = int(runner.vocab_size)
    ids = [(7 + 31 * i) % vocab for i in range(context_len + max(sizes) + (warmup + repeats) * len(sizes))]
    runner.reset()
    runner.prefill(ids[: context_len - 1])  # the cache holds context[:-1]; context[-1] is the root
    pos = context_len - 1  # index of the current root in ids
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for round_ in range(warmup + repeats):
        for size in sizes:
            draft = Draft.chain(ids[pos + 1 : pos + 1 + size])
            start = time.perf_counter()
            runner.verify(ids[pos], draft)
            runner.commit([])  # keeps the root; the next root is the next id
            elapsed = time.perf_counter() - start
            pos += 1
            if round_ >= warmup:
                times[size].append(elapsed)
    runner.reset()
    return LatencyCurve(sizes, tuple(monotone([statistics.median(times[s]) for s in sizes])), key)


def monotone(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): runs that decrease are
    replaced by their mean. [1, 3, 2, 4] -> [1, 2.5, 2.5, 4]."""
    blocks: list[list[float]] = []  # [sum, count] per pooled block
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on every platform
        return None


def curve_key(model_name: str, device: torch.device | str, dtype: torch.dtype | str, runner: str = "") -> str:
    """What a curve depends on: model, device (with its name on CUDA, with the product kernel on the CPU), dtype,
    runner kind ("fast" or "hf"), torch version and CPU threads."""
    device = torch.device(device)
    where = str(device)
    if device.type == "cuda":
        where += "-" + torch.cuda.get_device_name(device)
    elif device.type == "cpu" and runner == "fast":
        from leapdecode.models.fast import skinny

        where += "-" + skinny.tag()
    return f"{model_name}|{where}|{str(dtype).removeprefix('torch.')}|{runner or 'runner'}|" \
           f"torch-{torch.__version__}|threads-{torch.get_num_threads()}"


def curve_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    from leapdecode.models.load import cache_root

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    return cache_root(cache_dir) / "latency" / f"{name}.json"


def cached_latency_curve(model: Any, cache_dir: str | os.PathLike | None = None, sizes: Sequence[int] = DEFAULT_SIZES,
                         repeats: int = 3, context_len: int = 256, remeasure: bool = False) -> LatencyCurve:
    """The latency curve of `model` (a leapdecode Model) on its device and dtype: read from the cache when it was
    measured before with the same key and sizes, else measured now (a few seconds) and written atomically."""
    key = curve_key(model.name, model.device, model.dtype, model.runner_kind())
    path = curve_path(key, cache_dir)
    if path.is_file() and not remeasure:
        try:
            curve = LatencyCurve.from_json(json.loads(path.read_text()))
            if curve.key == key and curve.sizes == tuple(sizes):
                return curve
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # a stale or damaged file: measure again and overwrite it
    curve = measure_latency(model.runner(), sizes, repeats, context_len, key=key)
    data = curve.to_json()
    # for whoever reads the file: when, and how busy the machine was (a loaded machine skews the curve; measure
    # again with remeasure=True when it is quiet)
    data["measured"] = {"unix_time": round(time.time()), "load_average": _load_average()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=1)
    os.chmod(f.name, 0o644)  # as readable as the rest of the cache (the temporary file is created private)
    os.replace(f.name, path)  # atomic: readers see the old file or the new one, never half of one
    return curve
