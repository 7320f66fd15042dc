"""`leapdecode serve`: an OpenAI-compatible HTTP server with continuous batching and adaptive speculation.

    protocol.py     request bodies, responses, errors (the wire format)
    api.py          the FastAPI app: endpoints, streaming, auth, error handlers
    engine.py       one loaded target + scheduler; turns a validated request into a Sequence
    scheduler.py    the background thread: admit, decode step, chunked prefill, cancel, drain
    sequence.py     one request's decoding state, text and stop strings, and its events
    batch_runner.py the batched target runner over transformers' forward (per-sequence lengths, positions and
                    masks; slot KV cache); models/fast/batch.py is the one over leapdecode's own forward (default)
    metrics.py      Prometheus metrics
    process.py      run the server as a child process (tests, load generator)
    loadgen.py      the load generator (`leapdecode loadgen`)
    cli.py          the `serve` and `loadgen` commands
"""
