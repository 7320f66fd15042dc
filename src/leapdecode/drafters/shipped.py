"""Drafter tables shipped with leapdecode for known targets, so table drafters start warm.

`recycling`, `hybrid` and `aded` learn tables while they decode; a table distilled from the target beforehand
(`leapdecode distill-tables`, module leapdecode.distill) makes them draft well from the first request. The tables
for a target live in `shipped_tables/<fingerprint>/` beside this module, where the fingerprint identifies the
target by its tokenizer's vocabulary and its shape (however it was loaded: preset, .gguf file or directory). A
table of another model with the same tokenizer would still be lossless (tables only decide what is drafted), just
less useful.

The drafters' table options take "auto" (the default): the shipped table when the target has one, else an empty
table; "" for an empty table; or a path. "auto" is resolved by the drafters' `from_options`, i.e. where the target
is known: the CLI, the server, the bench and `registry.make_drafter(name, options, target=model)`. A drafter built
directly in Python (`Hybrid()`) does not know its target, so there "auto" means empty; pass
`table_path=shipped_table(model, "recycling.pt")` (or `table=...trigrams.npz` for ADED) to get the shipped one.
ADED keeps a loaded table's own top_k and cap, so with "auto" the shipped tri-grams are used only when neither
option is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).with_name("shipped_tables")
AUTO = "auto"
# hf_model -> (tokenizer, fingerprint): computing one takes ~0.2 s, and a server builds a drafter per request
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def target_fingerprint(model: Any) -> str:
    """sha256 of the tokenizer's (token, id) pairs and the model's hidden size and layer count, 16 hex digits.
    Remembered per loaded model (a server builds a drafter per request)."""
    try:
        tokenizer, digest = _FINGERPRINTS[model.hf_model]
        if tokenizer is model.tokenizer:
            return digest
    except (KeyError, TypeError):
        pass
    config = model.hf_model.config
    text_config = getattr(config, "text_config", None) or config
    vocab = sorted(model.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    shape = [int(model.vocab_size), int(getattr(text_config, "hidden_size", 0)),
             int(getattr(text_config, "num_hidden_layers", 0))]
    digest = hashlib.sha256(json.dumps([vocab, shape], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    try:
        _FINGERPRINTS[model.hf_model] = (model.tokenizer, digest)
    except TypeError:  # not weak-referenceable: compute again next time
        pass
    return digest


def shipped_table(model: Any, filename: str) -> str:
    """Path of the shipped `filename` (recycling.pt, trigrams.npz) for this target, or "" when there is none."""
    if model is None or getattr(model, "tokenizer", None) is None:
        return ""
    path = SHIPPED_DIR / target_fingerprint(model) / filename
    return str(path) if path.is_file() else ""


def is_auto(spec: Any) -> bool:
    """Whether a table option asks for the shipped table ("auto", any case and spacing)."""
    return isinstance(spec, str) and spec.strip().lower() == AUTO


def resolve_table(spec: str, target: Any, filename: str) -> str:
    """A table option's value as a path: "auto" becomes the shipped table for `target` (or "" without one)."""
    return shipped_table(target, filename) if is_auto(spec) else spec


@functools.lru_cache(maxsize=2)
def _shipped_trigrams(path: str):
    from leapdecode.drafters.trigram import TrigramTable

    return TrigramTable.load(path)


def shipped_trigrams(path: str):
    """A private copy of a shipped tri-gram table: the file (package data, never rewritten) is read and indexed
    once per process, since a server builds an ADED drafter per request and loading takes a noticeable moment."""
    return _shipped_trigrams(str(path)).copy()
