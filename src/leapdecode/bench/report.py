"""Turn raw benchmark rows into a summary (JSON), a Markdown table and a console table.

Everything here is a pure function of raw.jsonl and meta.json, so `leapdecode bench report DIR` rebuilds exactly
what the run wrote. Aggregates are ratios of sums (total tokens / total seconds), never means of ratios, and a
speed-up compares two methods on the same generations (question, turn, repeat). A method whose greedy output differs
from `none`'s anywhere is marked NOT EXACT in every table: that is never averaged away.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leapdecode.bench.methods import BASELINE, HF_GREEDY

OVERALL = "overall"
MAX_DEPTH_COLUMNS = 8  # acceptance-per-depth columns in the Markdown table (summary.json keeps every depth)
MAX_LISTED_MISMATCHES = 10

# Keys of one method's metrics in summary.json (the schema the tests check).
METRIC_KEYS = (
    "generations", "new_tokens", "seconds", "tokens_per_second", "speedup_vs_none", "speedup_vs_hf_greedy",
    "mat", "steps", "acceptance_per_depth", "drafter_share", "peak_memory_bytes", "drafter_state_bytes",
    "compared", "identical", "exact", "mismatches",
)
SUMMARY_KEYS = ("methods", "baseline", "categories", "sampled", "questions", "generations", "overall", "per_category")


# ---------------------------------------------------------------------------------------------------------- I/O


def load_raw(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / "raw.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: `leapdecode bench report DIR` needs the raw.jsonl of a run")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def load_meta(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------------ summary


def summarize(rows: Sequence[dict], meta: dict | None = None) -> dict:
    meta = meta or {}
    listed = [m["name"] for m in meta.get("methods", [])]
    seen = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in listed if m in seen] + [m for m in seen if m not in listed]
    categories = list(dict.fromkeys(r["category"] for r in rows))
    temperature = meta.get("config", {}).get("temperature")
    sampled = temperature > 0 if temperature is not None else all(r["identical"] is None for r in rows)
    per_category = {c: _metrics_by_method([r for r in rows if r["category"] == c], methods) for c in categories}
    questions = len({(r["category"], str(r["question_id"])) for r in rows})
    return {"methods": methods, "baseline": BASELINE, "categories": categories, "sampled": sampled,
            "questions": questions, "generations": len(rows), "overall": _metrics_by_method(rows, methods),
            "per_category": per_category}


def _metrics_by_method(rows: Sequence[dict], methods: Sequence[str]) -> dict[str, dict]:
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    return {m: _metrics(by_method[m], by_method.get(BASELINE, []), by_method.get(HF_GREEDY)) for m in methods}


def _key(row: dict) -> tuple:
    return str(row["question_id"]), row["turn"], row["repeat"]


def _tps(rows: Sequence[dict]) -> float | None:
    seconds = sum(r["seconds"] for r in rows)
    return sum(r["new_tokens"] for r in rows) / seconds if seconds > 0 else None


def _speedup(rows: Sequence[dict], reference: Sequence[dict] | None) -> float | None:
    """tokens/s of `rows` over tokens/s of `reference`, both on the generations they share."""
    if not reference or not rows:
        return None
    shared = {_key(r) for r in rows} & {_key(r) for r in reference}
    mine, theirs = _tps([r for r in rows if _key(r) in shared]), _tps([r for r in reference if _key(r) in shared])
    return mine / theirs if mine is not None and theirs else None


def _emitted(row: dict) -> int:
    """Tokens the target produced: accepted draft tokens plus one bonus per step, as Stats.mat counts them
    (before EOS or length truncation), which keeps plain decoding's MAT at exactly 1.00."""
    return row["accepted_tokens"] + row["steps"]


def _metrics(rows: Sequence[dict], baseline: Sequence[dict], hf_greedy: Sequence[dict] | None) -> dict[str, Any]:
    counted = [r for r in rows if r["steps"] is not None]  # methods that count steps (leapdecode)
    steps = sum(r["steps"] for r in counted) if counted else None
    drafted: list[int] = []
    accepted: list[int] = []
    for r in counted:
        for d, (n_d, n_a) in enumerate(zip(r["drafted_per_depth"], r["accepted_per_depth"])):
            if d == len(drafted):
                drafted.append(0)
                accepted.append(0)
            drafted[d] += n_d
            accepted[d] += n_a
    seconds = sum(r["seconds"] for r in rows)
    compared = [r for r in rows if r["identical"] is not None]
    mismatches = [{"question_id": r["question_id"], "category": r["category"], "turn": r["turn"],
                   "repeat": r["repeat"], "first_divergence": r["first_divergence"]}
                  for r in compared if not r["identical"]]
    states = [r["drafter_state_bytes"] for r in rows if r["drafter_state_bytes"] is not None]
    return {
        "generations": len(rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "seconds": seconds,
        "tokens_per_second": _tps(rows),
        "speedup_vs_none": _speedup(rows, baseline),
        "speedup_vs_hf_greedy": _speedup(rows, hf_greedy),
        "mat": sum(_emitted(r) for r in counted) / steps if steps else None,
        "steps": steps,
        "acceptance_per_depth": [a / d if d else 0.0 for a, d in zip(accepted, drafted)] if counted else None,
        "drafter_share": sum(r["drafter_seconds"] for r in counted) / seconds if counted and seconds > 0 else None,
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in rows), default=0),
        "drafter_state_bytes": max(states) if states else None,
        "compared": len(compared),
        "identical": sum(1 for r in compared if r["identical"]),
        "exact": (not mismatches) if compared else None,
        "mismatches": mismatches,
    }


# ----------------------------------------------------------------------------------------------------- Markdown


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB"


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**10:.1f} KiB"


def exact_label(metrics: dict, method: str, sampled: bool, markdown: bool = True) -> str:
    if method == BASELINE:
        return "reference"
    if sampled or metrics["exact"] is None:
        return "n/a (sampled)" if sampled else "-"
    n, same = metrics["compared"], metrics["identical"]
    if metrics["exact"]:
        return f"✓ {same}/{n}"
    text = f"NOT EXACT ({n - same}/{n} differ)"
    return f"🔴 ⚠ **{text}**" if markdown else f"⚠ {text}"


def header_lines(meta: dict, summary: dict) -> list[str]:
    """Where, when and what was run; counts come from the rows, so an interrupted run says it is partial."""
    if not meta:
        return []
    machine, versions, config = meta.get("machine", {}), meta.get("versions", {}), meta.get("config", {})
    where = machine.get("gpu") or f"{machine.get('cpu', 'CPU')} ({machine.get('cores', '?')} cores)"
    mode = "greedy" if not config.get("temperature") else f"temperature {config['temperature']}"
    sel = meta.get("selection", {})
    cats = ", ".join(sel.get("categories") or []) or "all"
    limit = f"first {sel['limit']} per category" if sel.get("limit") else "all questions"
    lines = [
        f"**{meta.get('model', '?')}** · {meta.get('dtype', '?')} · {meta.get('device', '?')} on {where} · "
        + (f"runner {meta['runner']} · " if meta.get("runner") else "") + f"{meta.get('date', '?')[:10]}",
        "",
        f"torch {versions.get('torch', '?')} · transformers {versions.get('transformers', '?')} · "
        f"leapdecode {versions.get('leapdecode', '?')}",
        "",
        f"Suite {meta.get('suite', {}).get('suite', '?')}: {summary['questions']} questions ({cats}; {limit}; "
        f"turns: {sel.get('turns', '?')}), {summary['generations']} generations"
        + (f" (**partial run**: {meta['generations']} planned)" if meta.get("generations", 0) > summary["generations"]
           else "") + f" · {mode} · "
        f"{config.get('max_new_tokens', '?')} new tokens · repeats {config.get('repeats', '?')} · "
        f"chat template {'on' if config.get('chat', True) else 'off'}",
    ]
    if meta.get("command"):
        lines += ["", f"`{meta['command']}`"]
    return lines + [""]


def render_markdown(summary: dict, meta: dict | None = None) -> str:
    meta = meta or {}
    methods, sampled = summary["methods"], summary["sampled"]
    overall = summary["overall"]
    memory = "peak GPU memory" if str(meta.get("device", "")).startswith("cuda") else "peak RSS"
    has_hf_greedy = HF_GREEDY in methods
    out = ["## leapdecode bench", ""] + header_lines(meta, summary)

    cols = ["method", "tok/s", "speed-up vs none"] + (["vs hf-greedy"] if has_hf_greedy else []) + \
           ["MAT", "drafter time", "drafter state", memory, "identical to none"]
    out += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 2) + ["---"]) + "|"]
    for m in methods:
        x = overall[m]
        name = f"**{m}** ⚠" if x["exact"] is False else m
        cells = [name, _f(x["tokens_per_second"], 1), _x(x["speedup_vs_none"])]
        cells += [_x(x["speedup_vs_hf_greedy"])] if has_hf_greedy else []
        share = "-" if x["drafter_share"] is None else f"{100 * x['drafter_share']:.0f}%"
        cells += [_f(x["mat"]), share, _kib(x["drafter_state_bytes"]), _mib(x["peak_memory_bytes"]),
                  exact_label(x, m, sampled)]
        out.append("| " + " | ".join(cells) + " |")

    out += ["", "tok/s: new tokens / wall seconds, prefill included, summed over all generations. Speed-up: tok/s "
            "over the reference's on the same generations. MAT: tokens per target step (plain decoding: 1.00). "
            "Identical to none: greedy outputs token-for-token equal to plain decoding's (`none`)."]
    out += ["", "### Speed-up over `none` by category (MAT in parentheses)", ""]
    cols = ["category", "generations", "none tok/s"] + [m for m in methods if m != BASELINE]
    out += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for c in summary["categories"] + [OVERALL]:
        block = overall if c == OVERALL else summary["per_category"][c]
        cells = [f"**{c}**" if c == OVERALL else c, str(block[BASELINE]["generations"]) if BASELINE in block else "-",
                 _f(block.get(BASELINE, {}).get("tokens_per_second"), 1)]
        for m in methods:
            if m == BASELINE:
                continue
            x = block[m]
            cell = _x(x["speedup_vs_none"]) + ("" if x["mat"] is None else f" ({x['mat']:.2f})")
            cells.append(cell + (" ⚠" if x["exact"] is False else ""))
        out.append("| " + " | ".join(cells) + " |")

    drafting = [m for m in methods if overall[m]["acceptance_per_depth"]]
    if drafting:
        depth = min(MAX_DEPTH_COLUMNS, max(len(overall[m]["acceptance_per_depth"]) for m in drafting))
        out += ["", "### Acceptance rate per draft depth (steps that drafted depth d and had it accepted)", ""]
        out += ["| method | " + " | ".join(f"d{d + 1}" for d in range(depth)) + " |",
                "|---|" + "---:|" * depth]
        for m in drafting:
            rates = overall[m]["acceptance_per_depth"]
            out.append(f"| {m} | " + " | ".join(f"{rates[d]:.2f}" if d < len(rates) else "-" for d in range(depth))
                       + " |")

    wrong = [m for m in methods if overall[m]["exact"] is False]
    if wrong:
        out += ["", "### ⚠ Outputs that differ from `none`", ""]
        if meta.get("dtype") in ("bfloat16", "float16"):
            out += [f"In {meta['dtype']}, scoring several tokens in one pass can round differently from one token "
                    "per pass, so a near-tie can flip; these counts measure that, and in float32 greedy outputs must "
                    "be identical.", ""]
        for m in wrong:
            x = overall[m]
            listed = ", ".join(f"{d['question_id']} turn {d['turn'] + 1}"
                               + (f" repeat {d['repeat'] + 1}" if d["repeat"] else "")
                               + f" from token {d['first_divergence']}"
                               for d in x["mismatches"][:MAX_LISTED_MISMATCHES])
            more = len(x["mismatches"]) - MAX_LISTED_MISMATCHES
            out.append(f"- 🔴 **{m}**: {len(x['mismatches'])} of {x['compared']} outputs differ ({listed}"
                       + (f", and {more} more" if more > 0 else "") + ")")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------ console


def console_table(summary: dict):
    """The overall table for the terminal; a method with any mismatch is printed in red."""
    from rich.table import Table

    methods, overall, sampled = summary["methods"], summary["overall"], summary["sampled"]
    table = Table(title="leapdecode bench (overall)")
    for col in ("method", "tok/s", "× none", "× hf-greedy", "MAT", "drafter time", "identical to none"):
        table.add_column(col, justify="left" if col in ("method", "identical to none") else "right")
    for m in methods:
        x = overall[m]
        style = "bold red" if x["exact"] is False else None
        share = "-" if x["drafter_share"] is None else f"{100 * x['drafter_share']:.0f}%"
        table.add_row(m, _f(x["tokens_per_second"], 1), _x(x["speedup_vs_none"]), _x(x["speedup_vs_hf_greedy"]),
                      _f(x["mat"]), share, exact_label(x, m, sampled, markdown=False), style=style)
    return table


# ------------------------------------------------------------------------------------------------------ outputs


def write_report(out_dir: str | os.PathLike, rows: Sequence[dict], meta: dict | None = None,
                 plots: bool = True) -> dict:
    """Write summary.json, table.md and (when matplotlib is there) the plots; return the summary."""
    out = Path(out_dir)
    summary = summarize(rows, meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "table.md").write_text(render_markdown(summary, meta), encoding="utf-8")
    if plots:
        from leapdecode.bench.plots import write_plots

        write_plots(out, summary)
    return summary
