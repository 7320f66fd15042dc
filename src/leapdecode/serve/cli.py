"""`leapdecode serve` (the HTTP server) and `leapdecode loadgen` (its load generator)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from leapdecode.cli import DEFAULT_MODEL, fail

err = Console(stderr=True)
_ERRORS = (ValueError, FileNotFoundError, ImportError, RuntimeError)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("loadgen")(loadgen)


def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Preset name, .gguf file or HF model directory."),
    drafter: str = typer.Option("copy", "--drafter", "-d", help="Default drafter (requests may name another, "
                                                                "e.g. \"none\")."),
    option: list[str] = typer.Option([], "--option", "-O", help="Default drafter's option KEY=VALUE (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="Port (0 = any free port; the log says which)."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients send (default: the model's)."),
    api_key: Optional[str] = typer.Option(None, envvar="LEAPDECODE_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' (prefer the environment "
                                               "variable: arguments are visible to other users)."),
    max_batch: int = typer.Option(8, help="Requests decoded together (batch slots)."),
    max_waiting: int = typer.Option(64, help="Requests queued for a slot; more are answered 429."),
    max_context: int = typer.Option(4096, help="Most prompt + completion tokens per request (capped by the "
                                               "model's positions)."),
    max_tokens_limit: int = typer.Option(2048, help="Largest max_tokens a request may ask for."),
    prefill_chunk: int = typer.Option(128, help="Prompt tokens prefilled per scheduler iteration."),
    max_draft: int = typer.Option(32, help="Longest draft per sequence and step (the scheduler adapts below it)."),
    drain_timeout: float = typer.Option(60.0, help="Seconds SIGTERM waits for running requests before exiting."),
    share_drafter_state: bool = typer.Option(False, help="Requests share what the drafter learns (recycling, "
                                             "hybrid: the token table and acceptance counts) instead of each "
                                             "starting from the shipped tables. Output is unchanged, but one "
                                             "request's text then shapes the drafts (and so the speed and the "
                                             "reported acceptance) of others; seeded sampling requests always get "
                                             "a private drafter. Off by default: with the shipped tables it gained "
                                             "nothing measurable (BENCHMARKS.md 0b)."),
    runner: str = typer.Option("auto", "--runner", help="Batched forward: fast (leapdecode's own, Llama/Qwen2/"
                               "Gemma 3 families), hf (transformers', any causal LM) or auto (fast where supported)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    log_level: str = typer.Option("info", help="uvicorn log level: critical, error, warning, info, debug."),
    trace: Optional[Path] = typer.Option(None, help="Append one JSON line per scheduler iteration to this file: "
                                         "sequences, rows, the cost model's price against the measured forward, "
                                         "expected against accepted draft tokens, drafter and prefill seconds "
                                         "(for tuning; see docs in leapdecode.serve.scheduler)."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching and adaptive speculation."""
    import torch
    import uvicorn

    from leapdecode.drafters.registry import info, parse_options
    from leapdecode.models.load import load_model
    from leapdecode.serve.api import create_app
    from leapdecode.serve.engine import Engine, ServeConfig

    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        options = parse_options(option)
        info(drafter)  # an unknown drafter fails before the model loads
        config = ServeConfig(served_name=served_model_name or model, drafter=drafter, drafter_options=options,
                             max_batch=max_batch, max_waiting=max_waiting, max_context=max_context,
                             max_tokens_limit=max_tokens_limit, prefill_chunk=prefill_chunk, max_draft=max_draft,
                             api_key=api_key, drain_timeout=drain_timeout, runner=runner,
                             share_drafter_state=share_drafter_state, trace=str(trace) if trace else None)
        with err.status(f"loading {model} ..."):
            target = load_model(model, device=device, dtype=dtype)
        if served_model_name is None:
            config = replace(config, served_name=target.name)
        engine = Engine(target, config)
    except _ERRORS as exc:
        fail(str(exc))
    err.print(f"serving {config.served_name!r} with drafter {drafter!r} (runner {engine.runner_kind}, batch "
              f"{max_batch}, queue {max_waiting}, context {engine.context_limit})"
              f"{'; API key required' if api_key else ''}")
    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=drain_timeout,
                limit_concurrency=max_batch + max_waiting + 16)  # beyond this uvicorn answers 503 by itself


def loadgen(
    url: Optional[str] = typer.Option(None, help="A running server, e.g. http://127.0.0.1:8000 (else --model "
                                                 "starts one)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model to serve when no --url is given."),
    drafter: str = typer.Option("copy", "--drafter", "-d", help="Drafter for 'speculation on' ('off' is none)."),
    concurrency: str = typer.Option("1,4,16", help="Comma-separated concurrency levels."),
    requests: int = typer.Option(32, help="Requests per (level, on/off, round). With as many requests as the "
                                          "concurrency, all start together and the run ends with the slowest one; "
                                          "several times the concurrency measures a server under steady load."),
    rounds: int = typer.Option(1, help="Times each level runs on and off, alternating which goes first; the report "
                                       "adds up the rounds and lists each round's speed-up."),
    max_tokens: int = typer.Option(128, help="max_tokens of every request."),
    ignore_eos: bool = typer.Option(False, help="Generate exactly max_tokens per request."),
    suite: str = typer.Option("spec-bench", help="Prompt source: spec-bench or builtin."),
    questions: Optional[Path] = typer.Option(None, help="Spec-Bench question.jsonl (default: the repository's)."),
    prompts: int = typer.Option(64, help="Distinct prompts (first turns, round-robin over categories)."),
    api_key: Optional[str] = typer.Option(None, envvar="LEAPDECODE_API_KEY", show_envvar=True),
    served_model_name: str = typer.Option("default", help="Model name sent in requests."),
    max_batch: Optional[int] = typer.Option(None, help="With --model: server batch slots (default: the highest "
                                                       "concurrency level)."),
    threads: Optional[int] = typer.Option(None, help="With --model: torch threads of the server."),
    runner: str = typer.Option("auto", "--runner", help="With --model: the server's batched forward (auto, fast, "
                                                         "hf; see `leapdecode serve --help`)."),
    share_drafter_state: bool = typer.Option(False, help="With --model: requests share what the drafter learns "
                                             "(see `leapdecode serve --help`)."),
    trace: Optional[Path] = typer.Option(None, help="With --model: the server writes its step trace here (see "
                                                     "`leapdecode serve --help`; summarise it with "
                                                     "scripts/trace_summary.py)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the markdown report here."),
) -> None:
    """Measure serving throughput and latency with speculation on vs off (same server, same run)."""
    from leapdecode.models.base import RUNNER_KINDS as RUNNERS
    from leapdecode.serve.loadgen import load_prompts, markdown, run_benchmark
    from leapdecode.serve.process import ServerProcess

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
        if not levels or min(levels) < 1 or requests < 1 or max_tokens < 1 or rounds < 1:
            raise ValueError("--concurrency levels, --requests, --max-tokens and --rounds must be >= 1")
        if runner not in RUNNERS:
            raise ValueError(f"unknown runner {runner!r}; available: {', '.join(RUNNERS)}")
        if trace is not None and url is not None:
            raise ValueError("--trace is for a server that loadgen starts (--model); start yours with "
                             "`leapdecode serve --trace FILE` instead")
        texts = load_prompts(suite, str(questions) if questions else None, prompts)
    except _ERRORS as exc:
        fail(str(exc))
    server = None
    if url is None:
        args = ["--model", model, "--drafter", drafter, "--max-batch", str(max_batch or max(levels)),
                "--max-waiting", str(max(256, max(levels))), "--runner", runner] + \
            (["--threads", str(threads)] if threads else []) + \
            (["--share-drafter-state"] if share_drafter_state else []) + \
            (["--trace", str(trace)] if trace else [])
        err.print(f"starting leapdecode serve {' '.join(args)} ...")
        server = ServerProcess(args, env={"LEAPDECODE_API_KEY": api_key} if api_key else None)
        try:
            url = server.wait_ready()
        except RuntimeError as exc:
            fail(str(exc))
    try:
        def progress(result) -> None:
            err.print(f"concurrency {result.concurrency:>3} {result.drafter:>10}: {len(result.ok)}/"
                      f"{len(result.results)} ok, {result.tokens_per_second:.1f} tok/s, "
                      f"p50 {result.latency(0.5):.2f} s, p95 {result.latency(0.95):.2f} s, MAT {result.mat:.2f}")

        results = run_benchmark(url, served_model_name, texts, requests, levels, drafter, max_tokens, api_key,
                                ignore_eos, progress, rounds)
    finally:
        if server is not None:
            server.stop()
    meta = {"command": "leapdecode loadgen " + shlex.join(sys.argv[2:]),
            "date": datetime.now().isoformat("T", "seconds"),
            "server": url if server is None else f"started here: leapdecode serve {shlex.join(args)}",
            "requests per row": f"{requests} x {rounds} rounds" if rounds > 1 else str(requests),
            "max_tokens": str(max_tokens), "prompts": f"{len(texts)} ({suite})"}
    report = markdown(results, drafter, meta)
    sys.stdout.write(report)
    if output is not None:
        output.write_text(report)
    if any(len(r.ok) != len(r.results) for r in results):
        raise typer.Exit(1)
