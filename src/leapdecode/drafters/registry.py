"""Name -> drafter class table, for the CLI and the server only (the library takes drafter objects).

Options arrive as strings ("max_ngram=4") and are converted to the type of the constructor's default value.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from leapdecode.drafters.base import Drafter

_CLASSES = {  # name -> "module:Class", imported on first use
    "none": "leapdecode.drafters.none:NoDrafter",
    "pld": "leapdecode.drafters.pld:PromptLookup",
    "copy": "leapdecode.drafters.copy:CopyDrafter",
    "draft-model": "leapdecode.drafters.draft_model:DraftModel",
    "recycling": "leapdecode.drafters.recycling:TokenRecycling",
    "hybrid": "leapdecode.drafters.hybrid:Hybrid",
    "lookahead": "leapdecode.drafters.lookahead:Lookahead",
    "aded": "leapdecode.drafters.aded:ADED",
}


@dataclass(frozen=True)
class DrafterInfo:
    name: str
    description: str
    options: dict[str, Any]  # option name -> default value (inspect.Parameter.empty when required)


def names() -> list[str]:
    return list(_CLASSES)


def drafter_class(name: str) -> type:
    if name not in _CLASSES:
        raise ValueError(f"unknown drafter {name!r}; available: {', '.join(_CLASSES)}")
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def info(name: str) -> DrafterInfo:
    cls = drafter_class(name)
    params = inspect.signature(cls.__init__).parameters
    options = {k: p.default for k, p in params.items()
               if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return DrafterInfo(name, getattr(cls, "description", ""), options)


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """["a=1", "b=x"] -> {"a": "1", "b": "x"}."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"drafter option {pair!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def make_drafter(name: str, options: dict[str, Any] | None = None, **context: Any) -> Drafter:
    """Build a drafter from its name and options (strings are converted to the defaults' types).

    `context` carries what some drafters need from the caller: `target` (the loaded target Model) for drafters that
    share its tokenizer or weights, and `device` / `dtype`.
    """
    kwargs = check_options(name, options)
    cls = drafter_class(name)
    if hasattr(cls, "from_options"):  # drafters that must load something (a draft model) build themselves
        return cls.from_options(kwargs, **context)
    return cls(**kwargs)


def check_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate option names for drafter `name` and convert string values; cheap, so callers check before loading."""
    spec = info(name)
    options = dict(options or {})
    unknown = set(options) - set(spec.options)
    if unknown:
        listed = ", ".join(spec.options) or "none"
        raise ValueError(f"drafter {name!r} has no option {sorted(unknown)[0]!r}; its options: {listed}")
    return {key: _convert(name, key, value, spec.options[key]) for key, value in options.items()}


def _convert(name: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or default is inspect.Parameter.empty or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if isinstance(default, (list, tuple)):
            return type(default)(int(v) for v in value.split(",") if v)
        return type(default)(value)
    except ValueError:
        raise ValueError(f"drafter {name!r} option {key!r} must be a {type(default).__name__}, got {value!r}") from None
