"""Load generator: N streamed chat requests at concurrency C against a leapdecode server, speculation on vs off.

Both configurations run against the same server process in the same run: "off" sends every request with
`drafter: "none"` (plain decoding through the same batched loop), "on" with the drafter under test. Per level the
order of the two alternates, so a slow drift of the machine's load does not always favour the same one; with
several rounds each level runs on and off that many times, the order alternating again per round. Reported per
(concurrency, drafter), over all rounds: output tokens per second (all completion tokens / wall time of the runs),
request latency p50 / p95, time to first token p50, mean MAT, and the speed-up over "off", then each round's
speed-up. Requests are greedy, so "on" and "off" must return identical texts; the report counts how many do.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    latency: float  # seconds, send to last byte
    ttft: float  # seconds, send to first text
    completion_tokens: int
    text: str
    mat: float
    error: str = ""


@dataclass
class LevelResult:
    drafter: str
    concurrency: int
    wall: float
    results: list[RequestResult] = field(default_factory=list)
    round: int = 0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def tokens_per_second(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.wall if self.wall > 0 else 0.0

    def latency(self, q: float) -> float:
        return _quantile([r.latency for r in self.ok], q)

    @property
    def ttft_p50(self) -> float:
        return _quantile([r.ttft for r in self.ok], 0.5)

    @property
    def mat(self) -> float:
        return statistics.fmean([r.mat for r in self.ok]) if self.ok else 0.0


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (p95 of 20 values is the 19th smallest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(round(q * len(ordered), 9))  # round: 0.95 * 20 must be 19, not 19.000000000000004
    return ordered[min(max(rank, 1), len(ordered)) - 1]


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    ttft, text, tokens, mat = 0.0, [], 0, 0.0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                return RequestResult(False, time.perf_counter() - start, 0.0, 0, "", 0.0,
                                     f"HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    return RequestResult(False, time.perf_counter() - start, ttft, tokens, "".join(text), mat,
                                         event["error"].get("message", "error"))
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft or time.perf_counter() - start
                        text.append(piece)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                    mat = event.get("leapdecode", {}).get("mat", 0.0)
    except httpx.HTTPError as exc:
        return RequestResult(False, time.perf_counter() - start, ttft, tokens, "".join(text), mat, repr(exc))
    return RequestResult(True, time.perf_counter() - start, ttft, tokens, "".join(text), mat)


async def run_level(url: str, model: str, prompts: Sequence[str], requests: int, concurrency: int, drafter: str,
                    max_tokens: int, api_key: str | None = None, ignore_eos: bool = False,
                    timeout: float = 600.0) -> LevelResult:
    """`requests` requests (prompt i % len(prompts)), at most `concurrency` in flight at any time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pending = iter(range(requests))
    results: list[RequestResult | None] = [None] * requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            for i in pending:  # the shared iterator hands each index to exactly one worker
                body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                        "max_tokens": max_tokens, "temperature": 0, "stream": True, "drafter": drafter,
                        "ignore_eos": ignore_eos}
                results[i] = await one_request(client, url, body, headers)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LevelResult(drafter, concurrency, wall, [r for r in results if r is not None])


def run_benchmark(url: str, model: str, prompts: Sequence[str], requests: int, levels: Sequence[int],
                  drafter: str, max_tokens: int, api_key: str | None = None, ignore_eos: bool = False,
                  progress=None, rounds: int = 1) -> list[LevelResult]:
    """Every level with speculation off ("none") and on (`drafter`), `rounds` times, alternating which goes
    first (per level, and again per round)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out = []
    asyncio.run(run_level(url, model, prompts, 1, 1, drafter, 8, api_key))  # warm-up (first-call allocations)
    for index, level in enumerate(levels):
        for round_ in range(rounds):
            order = ["none", drafter] if (index + round_) % 2 == 0 else [drafter, "none"]
            for name in order:
                result = asyncio.run(run_level(url, model, prompts, requests, level, name, max_tokens, api_key,
                                               ignore_eos))
                result.round = round_
                if progress is not None:
                    progress(result)
                out.append(result)
    return out


def merged(results: Sequence[LevelResult]) -> list[LevelResult]:
    """One result per (drafter, concurrency): every round's requests, and the sum of the rounds' wall times."""
    out: dict[tuple[str, int], LevelResult] = {}
    for r in results:
        key = (r.drafter, r.concurrency)
        if key not in out:
            out[key] = LevelResult(r.drafter, r.concurrency, 0.0)
        out[key].wall += r.wall
        out[key].results += r.results
    return list(out.values())


def identical_outputs(results: Sequence[LevelResult], drafter: str) -> tuple[int, int]:
    """(identical, compared): greedy texts of the same request index with speculation on and off, per level and
    round."""
    same = total = 0
    by_key = {(r.drafter, r.concurrency, r.round): r for r in results}
    for (name, level, round_), on in by_key.items():
        off = by_key.get(("none", level, round_))
        if name != drafter or off is None:
            continue
        for a, b in zip(on.results, off.results):
            if a.ok and b.ok:
                total += 1
                same += a.text == b.text
    return same, total


# two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (beyond: the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ratio_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): a 95% t-interval for the typical speed-up from per-round ratios (at least 2),
    computed on their logarithms (a ratio's noise is multiplicative). Rounds alternate which side runs first, so
    a drifting machine adds spread between rounds rather than a bias."""
    if len(ratios) < 2 or min(ratios) <= 0:
        raise ValueError(f"need at least 2 positive ratios, got {list(ratios)}")
    logs = [math.log(x) for x in ratios]
    mean = statistics.fmean(logs)
    t = T975[len(logs) - 2] if len(logs) - 1 <= len(T975) else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def markdown(results: Sequence[LevelResult], drafter: str, meta: dict[str, str]) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| concurrency | speculation | ok | output tok/s | p50 latency (s) | p95 latency (s) | "
              "TTFT p50 (s) | MAT | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    rows = merged(results)
    off = {r.concurrency: r for r in rows if r.drafter == "none"}
    for r in sorted(rows, key=lambda r: (r.concurrency, r.drafter != "none")):
        base = off.get(r.concurrency)
        speedup = r.tokens_per_second / base.tokens_per_second if base and base.tokens_per_second else float("nan")
        label = "off (none)" if r.drafter == "none" else f"on ({r.drafter})"
        lines.append(f"| {r.concurrency} | {label} | {len(r.ok)}/{len(r.results)} | {r.tokens_per_second:.1f} | "
                     f"{r.latency(0.5):.2f} | {r.latency(0.95):.2f} | {r.ttft_p50:.2f} | {r.mat:.2f} | "
                     f"{speedup:.2f}x |")
    rounds = sorted({r.round for r in results})
    if len(rounds) > 1:  # the spread between rounds says how much of a speed-up is the machine's noise
        lines.append("")
        runs = {(r.drafter, r.concurrency, r.round): r.tokens_per_second for r in results}
        for level in sorted({r.concurrency for r in results}):
            ratios = [runs[(drafter, level, k)] / runs[("none", level, k)] for k in rounds
                      if runs.get(("none", level, k)) and (drafter, level, k) in runs]
            line = f"- concurrency {level}, speed-up per round: " + ", ".join(f"{x:.2f}x" for x in ratios)
            if len(ratios) >= 3:
                mean, low, high = ratio_interval(ratios)
                line += f"; geometric mean {mean:.3f}x, 95% interval {low:.3f}x-{high:.3f}x"
            lines.append(line)
    same, total = identical_outputs(results, drafter)
    lines += ["", f"Greedy outputs identical with speculation on and off: {same}/{total}."]
    return "\n".join(lines) + "\n"


def load_prompts(suite: str, questions: str | None, limit: int) -> list[str]:
    """First turns of a bench suite's questions, round-robin over categories so a short run still mixes tasks."""
    from leapdecode.bench.suites import load_suite

    items, _ = load_suite(suite, questions)
    by_category: dict[str, list[str]] = {}
    for q in items:
        by_category.setdefault(q.category, []).append(q.turns[0])
    prompts, column = [], 0
    while len(prompts) < limit and any(column < len(v) for v in by_category.values()):
        prompts += [v[column] for v in by_category.values() if column < len(v)]
        column += 1
    return prompts[:limit]
