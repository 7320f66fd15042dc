"""Summarise a server's step trace: per drafter set and batch size, what the decode steps cost and emitted.

    leapdecode serve --drafter hybrid --max-batch 16 --trace trace.jsonl      # then load it, e.g. leapdecode loadgen
    .venv/bin/python scripts/trace_summary.py trace.jsonl [--min-steps 5]

See leapdecode.serve.trace for what each column means.
"""

from __future__ import annotations

import argparse

from leapdecode.serve.trace import markdown, read_trace, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="the file given to `leapdecode serve --trace`, or a gzipped copy (.gz)")
    ap.add_argument("--min-steps", type=int, default=1, help="leave out batch sizes with fewer steps than this")
    args = ap.parse_args()
    try:
        lines = read_trace(args.trace)
    except OSError as exc:
        raise SystemExit(f"cannot read the trace {args.trace!r}: {exc.strerror or exc}") from None
    if not lines:
        raise SystemExit(f"{args.trace}: no trace lines (was the server started with --trace and given requests?)")
    print(markdown(summarize(lines), args.min_steps), end="")


if __name__ == "__main__":
    main()
