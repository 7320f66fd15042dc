"""Per-step figures of a `leapdecode bench` run, from its raw.jsonl: draft nodes, drafter ms and target step ms.

    python scripts/per_step.py benchmarks/runs/2026-11-29-cpu-issue3
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(run_dir: str) -> None:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # nodes, steps, drafter s, wall s
    for line in (Path(run_dir) / "raw.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] != "leapdecode" or not row["steps"]:
            continue
        t = totals[row["method"]]
        t[0] += row["draft_tokens"]
        t[1] += row["steps"]
        t[2] += row["drafter_seconds"]
        t[3] += row["seconds"]
    print("| method | draft nodes / step | drafter ms / step | wall ms / step |")
    print("|---|---:|---:|---:|")
    for method, (nodes, steps, drafter, wall) in totals.items():
        print(f"| {method} | {nodes / steps:.2f} | {1000 * drafter / steps:.2f} | {1000 * wall / steps:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-results")
