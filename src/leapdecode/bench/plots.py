"""PNG plots of a benchmark summary: speed-up per category, MAT per category, tokens/s against MAT.

Methods whose greedy output differs from `none`'s are drawn hatched, with "NOT EXACT" in red in the legend.
"""

from __future__ import annotations

import os
from pathlib import Path

from leapdecode.bench.methods import BASELINE
from leapdecode.bench.report import OVERALL

PLOTS = ("speedup.png", "mat.png", "tps_vs_mat.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'leapdecode[bench]' (or matplotlib)") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label(summary: dict, method: str) -> str:
    return f"{method} (NOT EXACT)" if summary["overall"][method]["exact"] is False else method


def _grouped_bars(plt, summary: dict, methods: list[str], value: str, ylabel: str, title: str, path: Path,
                  reference: float | None) -> None:
    groups = summary["categories"] + [OVERALL]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    for i, method in enumerate(methods):
        values = []
        for g in groups:
            block = summary["overall"] if g == OVERALL else summary["per_category"][g]
            v = block.get(method, {}).get(value)
            values.append(0.0 if v is None else v)
        wrong = summary["overall"][method]["exact"] is False
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))], values, width,
               label=_label(summary, method), hatch="//" if wrong else None, edgecolor="red" if wrong else None)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    legend = ax.legend(fontsize="small")
    for text in legend.get_texts():
        if text.get_text().endswith("(NOT EXACT)"):
            text.set_color("red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(out_dir: str | os.PathLike, summary: dict) -> list[Path]:
    plt = _pyplot()
    out = Path(out_dir)
    others = [m for m in summary["methods"] if m != BASELINE]
    drafting = [m for m in summary["methods"] if summary["overall"][m]["mat"] is not None]
    _grouped_bars(plt, summary, others, "speedup_vs_none", "speed-up over none (tokens/s ratio)",
                  "Speed-up over plain decoding per category", out / PLOTS[0], reference=1.0)
    _grouped_bars(plt, summary, drafting, "mat", "MAT (tokens per target step)",
                  "Mean accepted tokens per step per category", out / PLOTS[1], reference=1.0)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in drafting:
        points = [(summary["per_category"][c][method]["mat"], summary["per_category"][c][method]["tokens_per_second"])
                  for c in summary["categories"]]
        points = [(m, t) for m, t in points if m is not None and t is not None]
        wrong = summary["overall"][method]["exact"] is False
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=_label(summary, method),
                   marker="x" if wrong else "o")
    ax.set_xlabel("MAT (tokens per target step)")
    ax.set_ylabel("tokens/s")
    ax.set_title("tokens/s against MAT (one point per category)")
    legend = ax.legend(fontsize="small")
    for text in legend.get_texts():
        if text.get_text().endswith("(NOT EXACT)"):
            text.set_color("red")
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=120)
    plt.close(fig)
    return [out / p for p in PLOTS]
