"""`leapdecode bench`: run methods side by side on a question suite; `leapdecode bench report DIR` re-renders."""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from leapdecode.cli import DEFAULT_MODEL, fail

err = Console(stderr=True)

bench_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=(
    "Benchmark decoding methods side by side: tokens/s, speed-up, MAT, acceptance per depth, memory and "
    "exactness against plain decoding. `leapdecode bench [OPTIONS]` runs; `leapdecode bench report DIR` re-renders."))

_ERRORS = (ValueError, FileNotFoundError, ImportError, RuntimeError)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    drafters: str = typer.Option(
        "none,pld,copy,hf-greedy,hf-pld", "--drafters", "-d",
        help="Comma-separated methods: leapdecode drafters (see `leapdecode drafters`) and HF baselines hf-greedy "
             "(generate), hf-pld (generate with prompt_lookup_num_tokens=10), hf-assisted (needs --assistant). "
             "`none` is always run: it is the reference for exactness and speed-up."),
    option: list[str] = typer.Option(
        [], "--option", "-O",
        help="Method option METHOD.KEY=VALUE (repeatable), e.g. --option pld.max_ngram=4 "
             "--option hf-pld.prompt_lookup_num_tokens=5."),
    suite: str = typer.Option("spec-bench", help="spec-bench (Spec-Bench question.jsonl) or builtin (a few prompts "
                                                 "per task, written for this project; runs anywhere)."),
    questions: Optional[Path] = typer.Option(
        None, "--questions", help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl "
                                  "relative to the repository root, when present)."),
    categories: Optional[str] = typer.Option(None, help="Comma-separated categories to run (default: all)."),
    limit: Optional[int] = typer.Option(None, help="First N questions of each category (default: all)."),
    turns: str = typer.Option("all", help="all: every turn of multi-turn questions (as Spec-Bench); first: only "
                                          "the first turn."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most new tokens per turn."),
    temperature: float = typer.Option(0.0, help="0 = greedy (exactness checked token by token); > 0 samples."),
    seed: int = typer.Option(0, help="Base seed for sampling."),
    repeats: int = typer.Option(1, help="Run every question this many times (interleaved)."),
    budget: int = typer.Option(64, help="Most draft nodes verified per step."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Preset name, .gguf file or HF model directory."),
    assistant: Optional[str] = typer.Option(None, help="Draft model for hf-assisted and draft-model (preset, .gguf "
                                                       "or HF directory; must share the target's vocabulary)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    runner_kind: Optional[str] = typer.Option(None, "--runner", help="Target runner for leapdecode methods "
                                                                     "(see Model.runner; default: the model's)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Render prompts with the model's chat template."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One short untimed generation per method first."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: "
                                                                "bench-results/<timestamp>)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots."),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Show a live progress bar."),
) -> None:
    """Run every method on every question (interleaved per question) and write raw.jsonl, summary.json, table.md,
    meta.json and PNG plots to --out."""
    if ctx.invoked_subcommand is not None:
        return
    import transformers

    from leapdecode import load_model
    from leapdecode.bench.methods import build_method, parse_methods
    from leapdecode.bench.report import console_table, write_report
    from leapdecode.bench.runner import BenchConfig, count_generations, make_meta, run_bench, write_meta
    from leapdecode.bench.suites import load_suite, select

    transformers.logging.set_verbosity_error()  # generate()'s advice would drown the progress bar
    try:
        config = BenchConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, repeats=repeats,
                             budget=budget, chat=chat, warmup=warmup)
        specs = parse_methods(drafters, option)
        wanted = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
        all_questions, suite_info = load_suite(suite, questions)
        chosen = select(all_questions, wanted, limit, turns)
        needy = [s.name for s in specs if s.name == "hf-assisted" or (s.name == "draft-model" and
                                                                        "model" not in s.options)]
        if needy and not assistant:
            raise ValueError(f"method {needy[0]!r} needs a draft model: pass --assistant MODEL")
        with err.status(f"loading {model} ..."):
            target = load_model(model, device=device, dtype=dtype)
            helper = load_model(assistant, device=device, dtype=dtype) if assistant else None
            runner = target.runner() if runner_kind is None else target.runner(runner_kind)
            methods = [build_method(s, target, runner, assistant=helper, budget=budget) for s in specs]
    except _ERRORS as exc:
        fail(str(exc))
    out_dir = out or Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (out_dir / "raw.jsonl").exists():
        fail(f"{out_dir / 'raw.jsonl'} already exists: choose another --out (a run never appends to an old one)")
    out_dir.mkdir(parents=True, exist_ok=True)
    total = count_generations(chosen, methods, config)
    meta = make_meta(model=target, methods=methods, config=config, suite=suite_info,
                     selection={"categories": wanted, "limit": limit, "turns": turns}, questions=len(chosen),
                     generations=total, command="leapdecode " + shlex.join(sys.argv[1:]), assistant=assistant,
                     runner=type(runner).__name__)
    write_meta(out_dir / "meta.json", meta)
    err.print(f"[dim]{len(chosen)} questions x {len(methods)} methods = {total} generations -> {out_dir}[/]")
    try:
        rows = _run_with_progress(target, chosen, methods, config, out_dir, progress_bar, run_bench, total)
    except _ERRORS as exc:
        fail(str(exc))
    summary = _report(out_dir, rows, meta, plots, write_report)
    Console().print(console_table(summary))
    err.print(f"wrote {out_dir}/ (raw.jsonl, summary.json, table.md, meta.json{', plots' if plots else ''})")
    if any(summary["overall"][m]["exact"] is False for m in summary["methods"]):
        err.print("[bold red]some methods changed the output: see table.md[/]")


@bench_app.command("report")
def report(
    directory: Path = typer.Argument(..., help="A bench output directory (holding raw.jsonl and meta.json)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots."),
) -> None:
    """Rebuild summary.json, table.md and the plots from DIR/raw.jsonl (+ meta.json)."""
    from leapdecode.bench.report import console_table, load_meta, load_raw, write_report

    try:
        rows, meta = load_raw(directory), load_meta(directory)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    summary = _report(directory, rows, meta, plots, write_report)
    Console().print(console_table(summary))
    err.print(f"rewrote {directory}/summary.json, table.md{' and plots' if plots else ''}")


def _report(out_dir, rows, meta, plots, write_report):
    try:
        return write_report(out_dir, rows, meta, plots=plots)
    except ImportError as exc:  # no matplotlib: keep the tables
        err.print(f"[yellow]no plots: {exc}[/]")
        return write_report(out_dir, rows, meta, plots=False)


def _run_with_progress(target, chosen, methods, config, out_dir, show, run_bench, total):
    """A live bar with ETA on a terminal; in a log file (not a terminal, where a live bar shows nothing until the
    end) a plain line at the start, then at most every LOG_EVERY seconds, and at the end."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    raw = out_dir / "raw.jsonl"
    if not show:
        return run_bench(target, chosen, methods, config, raw_path=raw)
    if not err.is_terminal:
        return run_bench(target, chosen, methods, config, raw_path=raw, progress=LogProgress(err.print))
    columns = (TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("warm-up", total=total)

        def update(done: int, _total: int, what: str) -> None:
            bar.update(task, completed=done, description=what)

        return run_bench(target, chosen, methods, config, raw_path=raw, progress=update)


class LogProgress:
    """Progress as log lines: 'bench 12/540 generations · 3m05s elapsed · eta 2h15m · rag 405 · copy'."""

    LOG_EVERY = 30.0  # seconds between lines

    def __init__(self, write) -> None:
        self.write, self.start, self.last = write, time.perf_counter(), None

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.perf_counter()
        if self.last is not None and now - self.last < self.LOG_EVERY and done < total:
            return
        self.last = now
        elapsed = now - self.start
        eta = _duration(elapsed / done * (total - done)) if done else "?"
        self.write(f"bench {done}/{total} generations · {_duration(elapsed)} elapsed · eta {eta} · {what}",
                   highlight=False)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
