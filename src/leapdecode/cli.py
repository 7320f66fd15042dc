"""Command line: `leapdecode generate`, `leapdecode drafters` (and the bench / serve sub-commands)."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="leapdecode: lossless parallel decoding. Same output as plain decoding, fewer forward passes.")
err = Console(stderr=True)

DEFAULT_MODEL = "smollm2-135m-instruct"


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; read from stdin when omitted."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Preset name, .gguf file or HF model directory."),
    drafter: str = typer.Option("copy", "--drafter", "-d", help="Drafter name (see `leapdecode drafters`)."),
    option: list[str] = typer.Option([], "--option", "-O", help="Drafter option KEY=VALUE (repeatable)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (reproducible runs)."),
    budget: int = typer.Option(64, help="Most draft nodes verified per step."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    stream_output: bool = typer.Option(False, "--stream/--no-stream", help="Print text as it is generated."),
    compare: bool = typer.Option(False, "--compare", help="Also run plain decoding; print speed-up and identity."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    runner_kind: str = typer.Option("auto", "--runner", help="hf (any model), fast (own forward, CUDA graphs) or "
                                    "auto (fast for supported models on CUDA, else hf)."),
    show_stats: bool = typer.Option(True, "--stats/--no-stats", help="Print decoding statistics to stderr."),
) -> None:
    """Generate text with a drafter; greedy output is identical to plain decoding."""
    from leapdecode import GenerationConfig, SamplingConfig, load_model, stream
    from leapdecode.drafters.registry import check_options, make_drafter, parse_options

    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            fail("no prompt: pass it as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    try:
        config = GenerationConfig(max_new_tokens=max_new_tokens, budget=budget, stop=tuple(stop),
                                  sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
        options = parse_options(option)
        check_options(drafter, options)  # fail fast, before the model loads
        if runner_kind not in ("auto", "hf", "fast"):
            raise ValueError(f"unknown runner {runner_kind!r}; available: auto, hf, fast")
        with err.status(f"loading {model} ..."):
            target = load_model(model, device=device, dtype=dtype)
            spec = make_drafter(drafter, options, target=target, device=device, dtype=dtype)
        ids = target.encode(prompt, chat=chat)
        runner = target.runner(runner_kind)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        fail(str(exc))
    text_stream = stream(target, ids, spec, config, runner=runner)
    for piece in text_stream:
        if stream_output:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(("" if stream_output else text_stream.text) + "\n")
    stats = text_stream.stats
    if show_stats:
        err.print(f"[dim]{stats.drafter}: {stats.new_tokens} tokens in {stats.steps} steps, MAT {stats.mat:.2f}, "
                  f"{stats.tokens_per_second:.1f} tok/s, drafter {stats.drafter_seconds * 1e3:.0f} ms, "
                  f"target {stats.target_seconds * 1e3:.0f} ms, stop: {stats.stop_reason}[/]")
    if compare:
        plain = stream(target, ids, None, config, runner=runner)
        for _ in plain:
            pass
        same = plain.tokens == text_stream.tokens
        speedup = stats.tokens_per_second / plain.stats.tokens_per_second if plain.stats.tokens_per_second else 0.0
        colour = "green" if same else "bold red"
        err.print(f"none: {plain.stats.tokens_per_second:.1f} tok/s | {stats.drafter}: "
                  f"{stats.tokens_per_second:.1f} tok/s | speed-up {speedup:.2f}x | "
                  f"[{colour}]outputs identical: {'yes' if same else 'NO'}[/]")
        if not same and config.sampling.greedy:
            raise typer.Exit(1)


@app.command()
def drafters() -> None:
    """List the drafters with a one-line description and their options."""
    from leapdecode.drafters.registry import info, names

    table = Table(show_lines=False)
    table.add_column("drafter", style="bold")
    table.add_column("description")
    table.add_column("options (default)")
    for name in names():
        spec = info(name)
        opts = ", ".join(f"{k}={'<required>' if v is _empty() else v}" for k, v in spec.options.items())
        table.add_row(name, spec.description, opts or "-")
    Console().print(table)


def _empty():
    import inspect

    return inspect.Parameter.empty


def main() -> None:
    _register_subcommands()
    app()


def _register_subcommands() -> None:
    """Sub-command groups living in their own packages (bench, serve) register here when present."""
    import importlib

    for module, name in (("leapdecode.bench.cli", "bench"), ("leapdecode.serve.cli", "serve"),
                         ("leapdecode.trigram_cli", "build-trigrams"),
                         ("leapdecode.distill_cli", "distill-tables")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not exc.name or not module.startswith(exc.name):  # a missing dependency, not a missing part
                raise
            continue
        mod.register(app)


if __name__ == "__main__":
    main()
