"""Helpers for the server tests: a tiny model directory with the real tokenizer, SSE reading, metrics polling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def tiny_model_dir(root: Path, **overrides) -> Path:
    """A tiny random-weight Llama with SmolLM2's real tokenizer (and chat template), saved as a HF directory.

    The server then loads it like any model (`--model DIR`) in about a second, and every tokenizer path (chat
    template, special tokens, detokenisation) is the real one. `overrides` go to the model config.
    """
    from transformers import AutoTokenizer

    from leapdecode.models.load import DEFAULT_PRESET, PRESETS, gguf_cache_path, load_model, preset_gguf
    from leapdecode.models.tiny import tiny_model

    cached = gguf_cache_path(preset_gguf(PRESETS[DEFAULT_PRESET]))
    if not cached.is_dir():
        load_model(DEFAULT_PRESET)  # builds the dequantised cache on a fresh machine
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = tiny_model("llama", tokenizer=tokenizer, seed=0, **overrides)
    path = root / "tiny-smollm2-tokenizer"
    model.hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sse_events(response: httpx.Response):
    """Decoded `data:` payloads of a server-sent-event stream; the string "[DONE]" for the terminator."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


def metric(url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    """The value of one sample from /metrics (0.0 when the labelled sample does not exist yet)."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, timeout: float = 60.0, interval: float = 0.05) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass (a bounded wait for something the server does
    asynchronously, such as freeing a slot after a disconnect)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
