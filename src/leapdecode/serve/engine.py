"""The server's engine: one loaded target, its batch runner and scheduler, and the rules that turn a validated HTTP
request into a Sequence (model name, limits, prompt encoding, sampling, drafter).

Everything here that can be wrong about a request raises APIError naming the offending field, before any work is
queued. Tokenizer calls from the event loop (encoding) and the scheduler thread (decoding) are serialised by one
lock: fast tokenizers are not safe to share between threads that may change their settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from leapdecode.decode import GenerationConfig
from leapdecode.drafters.base import Drafter
from leapdecode.drafters.registry import drafter_class, info, make_drafter
from leapdecode.models.base import RUNNER_KINDS, Model
from leapdecode.models.fast.batch import FastBatchRunner
from leapdecode.sampling import SamplingConfig
from leapdecode.serve.batch_runner import BatchRunner
from leapdecode.serve.metrics import ServerMetrics
from leapdecode.serve.protocol import APIError, ChatRequest, CompletionRequest
from leapdecode.serve.scheduler import Scheduler, SchedulerConfig
from leapdecode.serve.sequence import Sequence, TextAssembler, needs_reproducible_drafts
from leapdecode.draft_length import StepCost

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default


@dataclass(frozen=True)
class ServeConfig:
    served_name: str  # the model name clients send (the alias "default" is accepted too)
    drafter: str = "copy"  # drafter of requests that do not name one
    drafter_options: dict[str, Any] = field(default_factory=dict)  # options of the default drafter
    max_batch: int = 8
    max_waiting: int = 64
    max_context: int = 4096  # prompt + completion tokens, capped by the model's positions
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    chat_default_max_tokens: int = 256  # chat requests without max_tokens
    prefill_chunk: int = 128
    max_draft: int = 32
    api_key: str | None = None
    drain_timeout: float = 60.0  # seconds a shutdown waits for running requests
    runner: str = "auto"  # "fast": batched fast forward (models/fast/batch.py); "hf": transformers' forward;
    # "auto": fast where the model's architecture is supported, else hf
    share_drafter_state: bool = False  # requests fork one drafter per name (Drafter.fork) and share what it learns
    trace: str | None = None  # a file that gets one JSON line per scheduler iteration (Scheduler._write_trace)

    def __post_init__(self) -> None:
        if not self.served_name:
            raise ValueError("served_name must be a non-empty string")
        for name in ("max_batch", "max_context", "max_tokens_limit", "chat_default_max_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting", "max_draft", "drain_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.runner not in RUNNER_KINDS:
            raise ValueError(f"unknown runner {self.runner!r}; available: {', '.join(RUNNER_KINDS)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must be non-empty when given")


def batch_runner(model: Model, kind: str, max_batch: int) -> BatchRunner | FastBatchRunner:
    """The server's batched target runner: the fast forward over the model's FastRunner weights when `kind`
    resolves to "fast" (Model.runner_kind), transformers' forward otherwise."""
    if model.runner_kind(kind) == "fast":
        return FastBatchRunner(model.runner("fast"), max_batch)
    return BatchRunner(model.hf_model, max_batch)


class Engine:
    def __init__(self, model: Model, config: ServeConfig, cost: StepCost | None = None) -> None:
        if model.tokenizer is None:
            raise ValueError(f"model {model.name!r} has no tokenizer; the server needs one to read prompts")
        self.model, self.config = model, config
        self.metrics = ServerMetrics()
        self.runner = batch_runner(model, config.runner, config.max_batch)
        self.runner_kind = "fast" if isinstance(self.runner, FastBatchRunner) else "hf"
        self.scheduler = Scheduler(self.runner, SchedulerConfig(max_batch=config.max_batch,
                                                                max_waiting=config.max_waiting,
                                                                prefill_chunk=config.prefill_chunk,
                                                                max_draft=config.max_draft), self.metrics, cost)
        self.metrics.bind(self.scheduler)
        self.context_limit = min(config.max_context, self.runner.max_positions)
        self._tokenizer_lock = threading.Lock()
        self._drafter_context = {"target": model, "device": str(model.device),
                                 "dtype": str(model.dtype).removeprefix("torch.")}
        self._default_options = self._preload(config.drafter, config.drafter_options)
        self._shared: dict[str, Drafter] = {}  # name -> the drafter whose forks serve requests (share_drafter_state)
        self._shared_lock = threading.Lock()  # prepare() runs in a thread pool: one parent per name
        try:
            self.make_drafter(config.drafter)  # fail at start, not per request
        except APIError as exc:
            raise ValueError(exc.message) from None
        if config.trace:  # opened last: a start-up that fails above leaves no file handle behind
            try:
                self.scheduler.trace = open(config.trace, "a")
            except OSError as exc:
                raise ValueError(f"cannot write the trace file {config.trace!r}: {exc.strerror or exc}; give a "
                                 f"writable path") from None

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.config.served_name, "default")

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> bool:
        clean = self.scheduler.stop(drain=True, timeout=self.config.drain_timeout)
        if self.scheduler.trace is not None:
            self.scheduler.trace.close()
        return clean

    # ------------------------------------------------------------------------------------------------ requests

    def prepare(self, body: CompletionRequest | ChatRequest) -> tuple[list[int], GenerationConfig, Drafter]:
        """Validate a request against this server and encode it: (prompt ids, generation config, drafter)."""
        chat = isinstance(body, ChatRequest)
        if body.model not in self.model_names:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{self.config.served_name!r}", "model", "model_not_found")
        requested = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        max_tokens = requested or (self.config.chat_default_max_tokens if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        field_name = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        if max_tokens > self.config.max_tokens_limit:
            raise APIError(400, f"{field_name} is {max_tokens}, above this server's limit of "
                           f"{self.config.max_tokens_limit}", field_name, "max_tokens_too_large")
        ids = self._encode(body)
        prompt_field = "messages" if chat else "prompt"
        if not ids:
            raise APIError(400, f"{prompt_field} encodes to no tokens", prompt_field, "empty_prompt")
        if max(ids) >= self.runner.vocab_size:
            raise APIError(400, f"prompt token id {max(ids)} is outside the vocabulary ({self.runner.vocab_size})",
                           prompt_field, "invalid_token")
        if len(ids) + max_tokens > self.context_limit:
            if requested is None and len(ids) < self.context_limit:  # the default length shrinks to fit
                max_tokens = self.context_limit - len(ids)
            else:
                raise APIError(400, f"{prompt_field} has {len(ids)} tokens and {max_tokens} more were requested: "
                               f"{len(ids) + max_tokens} exceeds the context of {self.context_limit} tokens",
                               prompt_field, "context_length_exceeded")
        try:
            sampling = SamplingConfig(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                                      seed=body.seed)
            config = GenerationConfig(max_new_tokens=max_tokens, sampling=sampling, stop=body.stop_strings(),
                                      budget=self.config.max_draft, ignore_eos=body.ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc), None, "invalid_parameter") from None
        return ids, config, self.make_drafter(body.drafter, private=needs_reproducible_drafts(config))

    def make_drafter(self, name: str | None, private: bool = False) -> Drafter:
        """The drafter of one request: freshly built (from the shipped tables, where there are some), or, with
        share_drafter_state, for drafters that can fork (Drafter.fork: recycling, hybrid), a fork of one drafter
        kept per name, so every request drafts from what all earlier ones taught it; greedy output does not change,
        only its speed. `private` (seeded sampling, whose output must not depend on other traffic) always gets a
        freshly built drafter."""
        name = name or self.config.drafter
        if self.config.share_drafter_state and not private and hasattr(self._drafter_class(name), "fork"):
            with self._shared_lock:
                parent = self._shared.get(name)
                if parent is None:
                    parent = self._shared[name] = self._build_drafter(name)
                return parent.fork()
        return self._build_drafter(name)

    @staticmethod
    def _drafter_class(name: str) -> type | None:
        try:
            return drafter_class(name)
        except (ValueError, ImportError):
            return None  # _build_drafter reports it

    def _build_drafter(self, name: str) -> Drafter:
        options = self._default_options if name == self.config.drafter else {}
        try:
            if "adaptive" in info(name).options:  # the scheduler sizes drafts for the whole batch (draft_length.py)
                options = {**options, "adaptive": False}
            return make_drafter(name, options, **self._drafter_context)
        except (ValueError, TypeError, ImportError, OSError) as exc:  # OSError: a table file that is not there
            raise APIError(400, f"drafter {name!r} cannot be used: {exc}", "drafter", "invalid_drafter") from None

    def sequence(self, ids: list[int], config: GenerationConfig, drafter: Drafter,
                 sink: Callable[[Any], None]) -> Sequence:
        return Sequence(ids, config, drafter, sink, TextAssembler(self.decode, config.stop),
                        eos_token_ids=self.model.eos_token_ids, reproducible=needs_reproducible_drafts(config),
                        device=self.runner.device)

    def decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.model.decode(tokens)

    def _encode(self, body: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(body, ChatRequest):
            if not self.model.has_chat_template:
                raise APIError(400, f"model {self.config.served_name!r} has no chat template; use /v1/completions",
                               "messages", "no_chat_template")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            with self._tokenizer_lock:
                try:
                    return self.model.encode(messages, chat=True)
                except Exception as exc:  # a template may reject e.g. two system messages
                    raise APIError(400, f"the chat template rejected the messages: {exc}", "messages",
                                   "invalid_messages") from None
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        with self._tokenizer_lock:
            return self.model.encode(text, chat=False)

    def _preload(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Load a drafter's model option once (e.g. draft-model's model=...), so requests share the weights."""
        options = dict(options)
        if isinstance(options.get("model"), str):
            from leapdecode.models.load import load_model

            options["model"] = load_model(options["model"], device=self._drafter_context["device"],
                                          dtype=self._drafter_context["dtype"])
        return options
