"""Draft model: a smaller causal LM that shares the target's vocabulary proposes a chain of tokens.

The draft model runs autoregressively with its own KV cache (a transformers DynamicCache). The cache is kept in
sync with the context lazily: the drafter remembers which tokens its cache covers, and on each `propose` it keeps
the longest common prefix of those tokens and the context, crops the rest (rejected draft tokens), feeds the
missing tokens (the accepted ones and the bonus, or the whole prompt at first) in one forward pass, and then drafts.
The context is therefore never recomputed from scratch, and `observe` has nothing to do.

Cache invariant after `propose`: it covers `context + draft[:-1]`. The last drafted token is never fed: nothing
needs the draft model's logits after it.

Under greedy sampling the draft is the draft model's argmax chain and q is None (a deterministic draft). Under
sampling each token is drawn from the draft model's *warped* distribution (the same temperature/top-k/top-p as the
target) with the drafter's own seeded generator, and q carries those distributions so the acceptance rule
min(1, p/q), then norm(max(0, p - q)) stays exact.

The vocabularies of draft and target must match: token id t must mean the same string in both. When the draft's
output layer is padded wider than the target's, pass `vocab_size` (the target's) to cut the padded ids off, so
q has the target's width and padded ids are never drafted.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from leapdecode.drafters.base import Draft, StepResult
from leapdecode.sampling import SamplingConfig, make_generator, sample, warp


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModel:
    """Proposes a chain of up to `num_draft_tokens` tokens from a smaller causal LM with the target's vocabulary."""

    name = "draft-model"
    description = "a smaller causal LM with the target's vocabulary drafts a chain autoregressively (KV-cached)"

    def __init__(self, model: Any, num_draft_tokens: int = 5, vocab_size: int | None = None) -> None:
        """`model`: a transformers causal LM (PreTrainedModel with an LM head) or a leapdecode `Model`.

        `vocab_size`: keep only the first `vocab_size` ids of the draft logits (drop padded output rows so the
        draft matches the target's vocabulary width); None keeps the draft model's full output width.
        """
        if model is None:
            raise ValueError("model must be a causal LM (transformers PreTrainedModel or leapdecode Model), got None")
        hf_model = getattr(model, "hf_model", model)  # a leapdecode Model wraps the HF model
        if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "get_output_embeddings"):
            raise ValueError("model must be a transformers causal LM or a leapdecode Model, "
                             f"got {type(model).__name__}")
        head = hf_model.get_output_embeddings()
        if head is None:
            raise ValueError(f"model must be a causal LM with an output (LM head) layer; {type(hf_model).__name__} "
                             "has none (load it with AutoModelForCausalLM)")
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        model_vocab = int(head.weight.shape[0])
        if vocab_size is not None and not (1 <= vocab_size <= model_vocab):
            raise ValueError(f"vocab_size must be in [1, {model_vocab}] (the draft model's output width) or None, "
                             f"got {vocab_size}")

        self.hf_model = hf_model.eval()
        self.num_draft_tokens = num_draft_tokens
        self.vocab_size = model_vocab if vocab_size is None else vocab_size
        self.device = next(hf_model.parameters()).device
        # compute only the last row of logits when the model allows it (prompt prefill would otherwise build
        # [prompt_len, vocab] logits just to read one row)
        self._last_logits_only = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        self.reset([], SamplingConfig())

    @classmethod
    def from_options(cls, options: dict[str, Any], target: Any = None, device: str = "cpu",
                     dtype: str = "float32", **_: Any) -> "DraftModel":
        """Build from CLI/server options: `model` names a preset, .gguf file or HF directory to load."""
        from leapdecode.models.load import load_model

        options = dict(options)
        name = options.pop("model", None)
        if not name:
            raise ValueError("drafter 'draft-model' needs option model=NAME_OR_PATH (a smaller model with the "
                             "target's tokenizer)")
        model = load_model(name, device=device, dtype=dtype) if isinstance(name, str) else name
        if options.get("vocab_size") is not None:
            options["vocab_size"] = int(options["vocab_size"])
        elif target is not None:  # keep q as wide as the target's vocabulary
            options["vocab_size"] = min(target.vocab_size, model.vocab_size)
        return cls(model, **options)

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig) -> None:
        """Start a new request: empty cache, and a fresh generator for this request's seed."""
        self.sampling = sampling
        self._cache = DynamicCache()  # no config: every layer is a full, croppable DynamicLayer
        self._cached: list[int] = []  # the tokens whose KV the cache holds, in order
        # a mixed seed: the drafter's stream must differ from the target's (which uses `seed`) and from the target
        # stream of any other seed (seed + 1 would equal request seed + 1's acceptance stream)
        drafter_seed = None if sampling.seed is None else (sampling.seed * 0x9E3779B97F4A7C15 + 1) % 2**63
        self._generator = make_generator(drafter_seed, self.device)

    def observe(self, step: StepResult) -> None:
        """Nothing to learn: the next `propose` syncs the cache with the context it is given."""

    @torch.inference_mode()
    def propose(self, context: Sequence[int], budget: int) -> Draft:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if len(context) == 0:
            raise ValueError("context must hold at least the root token")
        n = min(self.num_draft_tokens, budget)
        if n == 0:
            return Draft.empty()
        context = [int(t) for t in context]

        # 1. sync the cache: keep the common prefix, but always re-feed at least the root to get logits after it
        keep = min(_common_prefix_len(self._cached, context), len(context) - 1)
        self._crop(keep)
        logits = self._forward(context[keep:], start=keep)  # [vocab] at the root

        # 2. draft: token i is drawn from the distribution after token i - 1 (after the root for i = 0)
        tokens: list[int] = []
        q_rows: list[torch.Tensor] = []
        for i in range(n):
            if self.sampling.greedy:
                token = int(logits.argmax())
            else:
                probs = warp(logits, self.sampling)  # [vocab] float32
                token = sample(probs, self._generator)
                q_rows.append(probs)
            tokens.append(token)
            if i + 1 < n:  # the last drafted token is never fed (see the cache invariant)
                logits = self._forward([token], start=len(self._cached))
        q = torch.stack(q_rows) if q_rows else None  # [n, vocab] float32, on the draft model's device
        return Draft.chain(tokens, q)

    def _crop(self, length: int) -> None:
        """Drop the cached KV of every token from position `length` on."""
        extra = len(self._cached) - length
        if extra > 0:
            self._cache.crop(-extra)  # a negative count removes that many trailing positions from every layer
            del self._cached[length:]

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Feed `tokens` at positions start, start + 1, ... (start = cache length); return the last logits [vocab]."""
        assert start == len(self._cached), "tokens must extend the cached sequence"
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, m]
        position_ids = torch.arange(start, start + len(tokens), device=self.device).unsqueeze(0)  # [1, m]
        kwargs = {"logits_to_keep": 1} if self._last_logits_only else {}
        out = self.hf_model(input_ids=input_ids, position_ids=position_ids, past_key_values=self._cache,
                            use_cache=True, **kwargs)
        self._cached.extend(tokens)
        return out.logits[0, -1, : self.vocab_size]  # [vocab]
