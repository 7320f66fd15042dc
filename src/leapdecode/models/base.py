"""What a loaded model is, and what a target runner must offer the decode loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from leapdecode.drafters.base import Draft


@runtime_checkable
class TargetRunner(Protocol):
    """Runs the target model for the decode loop.

    Invariant: the KV cache holds every committed token except the root (the last committed token). `verify`
    feeds the root and the draft nodes in one forward pass; `commit` keeps the KV of the root and of the accepted
    path and drops the rest, so afterwards the cache again holds everything except the new root (the bonus token).
    """

    supports_trees: bool
    vocab_size: int
    device: torch.device

    @property
    def cache_len(self) -> int: ...

    def reset(self) -> None: ...

    def prefill(self, tokens: Sequence[int]) -> None: ...

    def verify(self, root: int, draft: Draft) -> torch.Tensor: ...  # [n + 1, vocab] logits

    def commit(self, path: Sequence[int]) -> None: ...


RUNNER_KINDS = ("auto", "hf", "fast")


@dataclass
class Model:
    """A loaded target: the Hugging Face causal LM, its tokenizer and what the loop needs to know about them."""

    hf_model: Any  # transformers.PreTrainedModel (causal LM), in eval mode
    tokenizer: Any  # transformers tokenizer with its chat template (if the model has one)
    name: str
    eos_token_ids: tuple[int, ...]
    _fast_runner: Any = field(default=None, repr=False, compare=False)  # built on first runner("fast")

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.get_output_embeddings().weight.shape[0])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | list[dict[str, str]], chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: a plain string, or chat messages rendered with the model's chat template.

        chat=None uses the template when the model has one. A string with chat=True becomes one user message.
        """
        use_chat = self.has_chat_template if chat is None else chat
        if isinstance(prompt, list) or use_chat:
            if not self.has_chat_template:
                raise ValueError(f"model {self.name!r} has no chat template; pass a plain prompt with chat=False")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding regardless
                ids = ids["input_ids"]
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            return [int(t) for t in ids]
        return [int(t) for t in self.tokenizer(prompt, add_special_tokens=True)["input_ids"]]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def runner_kind(self, kind: str = "auto") -> str:
        """The runner `runner(kind)` returns, by name ("fast" or "hf"), without building it."""
        if kind not in RUNNER_KINDS:
            raise ValueError(f"unknown runner {kind!r}; available: {', '.join(RUNNER_KINDS)}")
        if kind == "auto":
            from leapdecode.models.fast import supported

            return "fast" if self.device.type in ("cuda", "cpu") and supported(self.hf_model) else "hf"
        return kind

    def runner(self, kind: str = "auto") -> TargetRunner:
        """A target runner for this model.

        kind: "hf" (any causal LM, through transformers), "fast" (own forward, static KV cache and CUDA graphs, for
        the Llama family and Gemma 3; models/fast), or "auto": fast for a supported architecture on CUDA or CPU, else
        hf (other devices, other architectures).
        The fast runner is built once per Model and reused (fusing weights and capturing graphs is worth keeping);
        like any runner it serves one request at a time, so build FastRunner(model.hf_model) for a second stream.
        """
        kind = self.runner_kind(kind)
        if kind == "fast":
            from leapdecode.models.fast import FastRunner

            if self._fast_runner is None:
                self._fast_runner = FastRunner(self.hf_model)  # ValueError naming the reason when unsupported
            return self._fast_runner
        from leapdecode.models.hf import HFRunner

        return HFRunner(self.hf_model)
