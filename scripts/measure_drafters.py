"""Measure drafters against plain decoding on Spec-Bench questions: MAT and tokens/s per category.

    .venv/bin/python scripts/measure_drafters.py --per-category 10 --drafter none --drafter hybrid \
        --drafter recycling:tree_budget=16 --json out.json

    # MAT on another device (e.g. a GPU in float32), with tokens/s modelled from a CPU latency curve measured
    # elsewhere ({"nodes": ms}): auto budgets then choose for that CPU, and [modelled tok/s] is printed
    .venv/bin/python scripts/measure_drafters.py --device cuda --curve cpu_curve.json --drafter hybrid

Greedy, first turn of each question, chat template, up to --new-tokens tokens (EOS ends an answer early, as in
Spec-Bench). Every drafter runs on the same question right after the others (order rotated per question), so a load
change on the shared machine hits all of them alike; the same drafter object serves all questions, so drafters
that learn across requests (Token Recycling's table) are measured warm, as deployed. Each drafter's output is
checked token-for-token against plain decoding's.

tokens/s is decoding speed: new tokens / (request time - prefill time); prefill is the same for every drafter.
Options after the drafter name are its registry options (name:key=value:...); template_size=NODESxDEPTH is a
shorthand of this script for a best-first recycling template.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from leapdecode import GenerationConfig, speculate
from leapdecode.budget import LatencyCurve, curve_key, curve_path
from leapdecode.drafters.recycling import DEFAULT_RANK_ACCEPTANCE, best_first_template
from leapdecode.drafters.registry import make_drafter, parse_options
from leapdecode.models.load import load_model
from leapdecode.stats import Stats

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "spec_bench" / "question.jsonl"


def questions(path: Path, per_category: int, categories: list[str] | None, skip: int = 0) -> list[dict]:
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        q = json.loads(line)
        by_cat[q["category"]].append(q)
    cats = categories or list(by_cat)
    return [q for c in cats for q in by_cat[c][skip : skip + per_category]]


def plant_curve(model, path: Path) -> LatencyCurve:
    """Make a latency curve measured elsewhere ({nodes: ms} JSON) the one `cached_latency_curve(model)` returns, in
    a private cache directory (never the user's), so auto-sized drafters choose as on that machine."""
    os.environ["LEAPDECODE_CACHE"] = tempfile.mkdtemp(prefix="leapdecode-curve-")
    ms = dict(sorted((int(k), float(v)) for k, v in json.loads(path.read_text()).items()))
    key = curve_key(model.name, model.device, model.dtype, model.runner_kind())
    curve = LatencyCurve(tuple(ms), tuple(v / 1000 for v in ms.values()), key)
    curve_path(key).parent.mkdir(parents=True, exist_ok=True)
    curve_path(key).write_text(json.dumps(curve.to_json()))
    return curve


class SizeRecorder:
    """A target runner that notes the rows of every verify beyond the root (draft nodes plus any auxiliary rows,
    e.g. Lookahead's Jacobi window) for the modelled time; otherwise the runner."""

    def __init__(self, runner) -> None:
        self.runner, self.sizes = runner, []

    def verify(self, root, draft):
        self.sizes.append(draft.n + (0 if draft.aux_tokens is None else int(draft.aux_tokens.numel())))
        return self.runner.verify(root, draft)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def run_one(runner, prompt, drafter, new_tokens, eos) -> tuple[list[int], Stats]:
    stats = Stats()
    config = GenerationConfig(max_new_tokens=new_tokens)
    out = [t for step in speculate(runner, prompt, drafter, config, eos, stats) for t in step]
    return out, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--skip", type=int, default=0, help="skip the first questions of each category")
    ap.add_argument("--categories", default="", help="comma-separated; default all 13")
    ap.add_argument("--drafter", action="append", default=[],
                    help="repeatable; a registry name, with options as name:key=value:key=value "
                         "(default: none, recycling, hybrid). template_size=NODESxDEPTH builds a best-first template")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="preset name or .gguf path (default: the default preset)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--json", default="", help="write per-question records here")
    ap.add_argument("--save-table", default="", help="save the recycling drafter's table here at the end")
    ap.add_argument("--curve", default="",
                    help="a latency curve JSON ({size: ms}): drafters with tree_budget=auto use it instead of "
                         "measuring, and a modelled tokens/s (sum of curve latencies of the drafted sizes plus "
                         "drafter time) is reported, for runs on another device than the one modelled")
    ap.add_argument("--dump-template", default="", help="write the recycling template's paths and hit counts here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    runner = model.runner()
    curve = plant_curve(model, Path(args.curve)) if args.curve else None
    runner = SizeRecorder(runner)
    labels, drafters = [], []
    for spec in args.drafter or ["none", "recycling", "hybrid"]:
        name, *opts = spec.split(":")
        options = parse_options(opts)
        if "template_size" in options:  # a script-only shorthand for long templates
            nodes, depth = (int(v) for v in options.pop("template_size").split("x"))
            options["template"] = ";".join(",".join(map(str, p)) for p in
                                           best_first_template(DEFAULT_RANK_ACCEPTANCE, nodes, depth))
        labels.append(spec)
        drafters.append(make_drafter(name, options, target=model))
    qs = questions(Path(args.data), args.per_category, [c for c in args.categories.split(",") if c] or None,
                   args.skip)
    records = []
    start = time.time()
    for qi, q in enumerate(qs):
        prompt = model.encode(q["turns"][0])
        order = list(range(len(drafters)))
        order = order[qi % len(order):] + order[: qi % len(order)]
        outs = {}
        for i in order:
            runner.sizes.clear()
            out, stats = run_one(runner, prompt, drafters[i], args.new_tokens, model.eos_token_ids)
            modelled = sum(curve.latency(n) for n in runner.sizes) + stats.drafter_seconds if curve else 0.0
            outs[i] = out
            decode_s = stats.total_seconds - stats.prefill_seconds
            records.append(dict(question_id=q["question_id"], category=q["category"], drafter=labels[i],
                                new_tokens=stats.new_tokens, steps=stats.steps, mat=stats.mat,
                                decode_seconds=decode_s, drafter_seconds=stats.drafter_seconds,
                                target_seconds=stats.target_seconds, draft_tokens=stats.draft_tokens,
                                modelled_seconds=modelled,
                                extra={k: v for k, v in stats.extra.items() if k != "latency_curve_ms"}))
        base = outs[0]
        for i in range(1, len(drafters) if labels[0] == "none" else 0):
            if outs[i] != base:
                first = next((j for j, (a, b) in enumerate(zip(outs[i], base)) if a != b), min(len(outs[i]),
                                                                                              len(base)))
                print(f"MISMATCH {labels[i]} q{q['question_id']} at {first}", file=sys.stderr)
                records[-len(drafters) + order.index(i)]["mismatch"] = first
        print(f"[{qi + 1}/{len(qs)} {time.time() - start:.0f}s] {q['category']} q{q['question_id']} "
              + " ".join(f"{r['drafter']}={r['mat']:.2f}/{r['new_tokens'] / r['decode_seconds']:.1f}"
                         for r in records[-len(drafters):]), file=sys.stderr, flush=True)
        save(args, records, drafters)  # after every question, so an interrupted run keeps what it measured
    summarize(records, labels)
    for label, d in zip(labels, drafters):
        if hasattr(d, "report"):
            print(f"{label} report: {json.dumps(d.report())}")
        if hasattr(d, "state_bytes"):
            print(f"{label} state bytes: {d.state_bytes()}")
    if args.save_table:
        for d in drafters:
            if hasattr(d, "save"):
                d.save(args.save_table)
                break
    return 0


def save(args, records: list[dict], drafters: list) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.dump_template:
        for d in drafters:
            template = getattr(getattr(d, "recycling", d), "template", None)
            if template is not None:
                Path(args.dump_template).write_text(json.dumps(
                    {"paths": template.paths, "trials": template.trials.tolist(), "hits": template.hits.tolist()}))
                break


def summarize(records: list[dict], labels: list[str]) -> None:
    cats = list(dict.fromkeys(r["category"] for r in records))
    print(f"{'category':<15}" + "".join(f"{lab[:22]:>24}" for lab in labels))
    print(f"{'':<15}" + "".join(f"{'MAT  tok/s  x':>24}" for _ in labels))
    for cat in cats + ["overall"]:
        row = [r for r in records if cat == "overall" or r["category"] == cat]
        line = f"{cat:<15}"
        base_rate = None
        for lab in labels:
            rs = [r for r in row if r["drafter"] == lab]
            tokens, steps = sum(r["new_tokens"] for r in rs), sum(r["steps"] for r in rs)
            secs = sum(r["decode_seconds"] for r in rs)
            rate = tokens / secs if secs else 0.0
            base_rate = rate if base_rate is None else base_rate
            line += f"{tokens / max(steps, 1):>10.2f}{rate:>8.1f}{rate / base_rate:>6.2f}"
            modelled = sum(r.get("modelled_seconds", 0.0) for r in rs)
            if modelled:
                line += f" [{tokens / modelled:.1f}]"
        print(line)
    for lab in labels[1:]:
        rs = [r for r in records if r["drafter"] == lab]
        steps = sum(r["steps"] for r in rs)
        per_step = sum(r["drafter_seconds"] for r in rs) / max(steps, 1)
        target = sum(r["target_seconds"] for r in rs) / max(steps, 1)
        nodes = sum(r["draft_tokens"] for r in rs) / max(steps, 1)
        bad = sum(1 for r in rs if "mismatch" in r)
        print(f"{lab}: drafter {1000 * per_step:.2f} ms/step, target {1000 * target:.1f} ms/step, "
              f"{nodes:.1f} draft nodes/step, outputs differing from plain: {bad}/{len(rs)}")
    rs = [r for r in records if r["drafter"] == labels[0]]
    steps = sum(r["steps"] for r in rs)
    print(f"{labels[0]}: target {1000 * sum(r['target_seconds'] for r in rs) / max(steps, 1):.1f} ms/step; "
          f"median question tok/s {statistics.median(r['new_tokens'] / r['decode_seconds'] for r in rs):.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
