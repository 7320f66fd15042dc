"""`leapdecode build-trigrams`: count the tri-grams of text files, tokenised with the target's tokenizer, into a
table for the ADED drafter (`--drafter aded --option table=PATH`).

A good corpus is text the target wrote itself (ADED's table imitates the target's output distribution); never the
benchmark's own questions. Files are read as UTF-8 text in blocks of whole lines (about 64 KiB each); tri-grams are
counted within a block, so a file loses only the two tri-grams at each block boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

err = Console(stderr=True)
BLOCK_BYTES = 1 << 16


def register(app: typer.Typer) -> None:
    app.command("build-trigrams")(build_trigrams)


def build_trigrams(
    files: Optional[list[Path]] = typer.Argument(None, help="More corpus files (so `--corpus a.txt b.txt` works).",
                                                 show_default=False),
    corpus: list[Path] = typer.Option([], "--corpus", "-c", help="Text file to count (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the table (.npz)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                              help="Preset name, .gguf file or HF model directory whose tokenizer is used."),
    top_k: int = typer.Option(8, "--top-k", help="Successors kept per context (token pair or single token)."),
    cap: float = typer.Option(16.0, help="Most total weight per context; heavier rows are scaled down to it."),
    min_count: int = typer.Option(1, "--min-count", help="Drop tri-grams seen fewer times than this."),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Build an ADED tri-gram table from text files, tokenised with the model's tokenizer."""
    from leapdecode.cli import fail
    from leapdecode.drafters.trigram import TrigramTable

    paths = list(corpus) + list(files or [])
    if not paths:
        fail("no corpus: pass text files with --corpus FILE (repeatable, or several after one --corpus)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        fail(f"corpus file not found: {missing[0]}")
    if out.parent and not out.parent.is_dir():
        fail(f"output directory {str(out.parent)!r} does not exist")
    try:
        TrigramTable(top_k=top_k, cap=cap)  # validates top_k and cap before the slow part
        if min_count < 1:
            raise ValueError(f"--min-count must be >= 1, got {min_count}")
        tokenizer = _load_tokenizer(model)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        fail(str(exc))

    sequences = []
    total_bytes = sum(p.stat().st_size for p in paths)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("tokenising", total=total_bytes)
        for path in paths:
            try:
                for block, size in _blocks(path):
                    sequences.append(tokenizer(block, add_special_tokens=False)["input_ids"])
                    progress.advance(task, size)
            except UnicodeDecodeError as exc:
                fail(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})")
    with err.status("counting tri-grams ..."):
        table = TrigramTable.from_sequences(sequences, top_k=top_k, cap=cap, min_count=min_count)
    table.save(out)
    tokens = sum(len(s) for s in sequences)
    err.print(f"{tokens} tokens from {len(paths)} file(s) -> {len(table)} contexts (token pairs and single tokens), "
              f"top {top_k} successors each, {table.state_bytes() / 2**20:.1f} MiB in memory"
              + (f", {table.dropped} lightest contexts left out for room" if table.dropped else "")
              + f"; written to {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def _load_tokenizer(model: str):
    """The tokenizer of `model` (loads the model through load_model: cached after the first time)."""
    from leapdecode.models.load import load_model

    with err.status(f"loading {model} ..."):
        loaded = load_model(model)
    if loaded.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer")
    return loaded.tokenizer


def _blocks(path: Path):
    """(text, bytes) blocks of whole lines of about BLOCK_BYTES each."""
    lines: list[str] = []
    size = 0
    with path.open("r", encoding="utf-8", newline="") as f:
        for line in f:
            lines.append(line)
            size += len(line.encode("utf-8"))
            if size >= BLOCK_BYTES:
                yield "".join(lines), size
                lines, size = [], 0
    if lines:
        yield "".join(lines), size
