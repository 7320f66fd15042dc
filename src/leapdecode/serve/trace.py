"""Reading the scheduler's step trace (`leapdecode serve --trace FILE`): where a server's time went, and how well the
scheduler's models predicted it.

The scheduler writes one JSON line per iteration (Scheduler._write_trace). `summarize` groups the decode steps by
the drafters of their sequences ("none", "hybrid", or several joined by "+") and by the number of sequences in the
step, and adds up, per group, what the steps cost and what they emitted:

- forward: measured seconds of the batched verification pass; priced: what the cost model said that pass would
  take; plain: what it said a pass without drafts (one row per sequence) would take;
- drafter: the drafters' own work (choosing lengths with their estimates, proposing, observing the outcome);
  other: the rest of the step (acceptance, commit, emitting tokens to the clients, statistics);
- expected: the draft tokens the scheduler expected to be accepted (the chances it chose the rows by); accepted:
  the draft tokens that were; emitted: accepted + one token per sequence;
- resting: sequences whose drafter sat the step out (draft_length.DrafterUpkeep);
- tokens/s: emitted tokens per second of decode step (forward + drafter + other), prefill not included.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Group:
    """Sums over the decode steps of one group."""

    steps: int = 0
    rows: float = 0.0
    forward_s: float = 0.0
    priced_s: float = 0.0
    plain_s: float = 0.0
    drafter_s: float = 0.0
    other_s: float = 0.0
    expected: float = 0.0
    accepted: float = 0.0
    emitted: float = 0.0
    resting: float = 0.0

    def add(self, line: dict) -> None:
        self.steps += 1
        self.rows += line["rows"]
        for name in ("forward_s", "priced_s", "plain_s"):
            setattr(self, name, getattr(self, name) + line[name])
        drafter = line.get("choose_s", 0.0) + line.get("propose_s", 0.0) + line.get("observe_s", 0.0)
        self.drafter_s += drafter
        self.other_s += line.get("accept_s", 0.0) - line.get("observe_s", 0.0)
        self.expected += line["expected"]
        self.accepted += line["accepted"]
        self.emitted += line["accepted"] + line["sequences"]
        self.resting += line.get("resting", 0)

    @property
    def step_seconds(self) -> float:
        return self.forward_s + self.drafter_s + self.other_s

    @property
    def tokens_per_second(self) -> float:
        return self.emitted / self.step_seconds if self.step_seconds > 0 else 0.0


@dataclass
class Summary:
    by_size: dict[tuple[str, int], Group] = field(default_factory=lambda: defaultdict(Group))  # (drafters, seqs)
    by_drafters: dict[str, Group] = field(default_factory=lambda: defaultdict(Group))
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    iterations: int = 0
    iteration_s: float = 0.0


def read_trace(path: str | Path) -> list[dict]:
    """The trace's lines as dicts, from the file or its gzipped copy (name ending in .gz); a half-written last line
    (the server was stopped mid-write) is skipped."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (EOFError, zlib.error) as exc:  # cut short or damaged (a wrong header is already an OSError)
            raise OSError(f"not a whole gzip file: {exc}") from None
    lines = []
    for text in data.decode("utf-8", errors="replace").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def summarize(lines: Iterable[dict]) -> Summary:
    summary = Summary()
    for line in lines:
        summary.iterations += 1
        summary.iteration_s += line["iteration_s"]
        summary.prefill_s += line["prefill_s"]
        summary.prefill_tokens += line["prefill_tokens"]
        if "rows" not in line:  # no decode step in this iteration (only prefill), or every drafter failed
            continue
        drafters = "+".join(line["drafters"])
        summary.by_size[(drafters, line["sequences"])].add(line)
        summary.by_drafters[drafters].add(line)
    return summary


def markdown(summary: Summary, min_steps: int = 1) -> str:
    """Two tables: per drafter set, and per drafter set and batch size (groups of at least `min_steps` steps); every
    time is a mean per step in milliseconds."""
    head = ("| drafters | sequences | steps | rows | forward ms | priced ms | plain ms | drafter ms | other ms | "
            "expected | accepted | resting | tokens/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def row(name: str, size: str, g: Group) -> str:
        n = g.steps
        return (f"| {name} | {size} | {n} | {g.rows / n:.1f} | {1e3 * g.forward_s / n:.1f} | "
                f"{1e3 * g.priced_s / n:.1f} | {1e3 * g.plain_s / n:.1f} | {1e3 * g.drafter_s / n:.2f} | "
                f"{1e3 * g.other_s / n:.2f} | {g.expected / n:.2f} | {g.accepted / n:.2f} | {g.resting / n:.2f} | "
                f"{g.tokens_per_second:.1f} |\n")

    out = [f"{summary.iterations} iterations, {summary.iteration_s:.1f} s; prefill {summary.prefill_tokens} tokens "
           f"in {summary.prefill_s:.1f} s\n\n", head]
    out += [row(name, "all", g) for name, g in sorted(summary.by_drafters.items())]
    out += ["\n", head]
    out += [row(name, str(size), g) for (name, size), g in sorted(summary.by_size.items()) if g.steps >= min_steps]
    return "".join(out)
