"""Tiny random-weight models for tests: real transformers architectures, small enough to run in milliseconds.

Lossless decoding must hold for any weights, so random ones are as good a test as trained ones, provided the
output distribution is not degenerate: with the usual initializer_range of 0.02 the logits are nearly flat and the
last token's embedding dominates. A larger initializer_range spreads the logits so that greedy decoding wanders over
the vocabulary and sampling sees distributions that are neither uniform nor one-hot.
"""

from __future__ import annotations

from typing import Any

import torch

from leapdecode.models.base import Model

ARCHS = ("llama", "qwen2", "gemma3")

# Shared shape: 4 query heads sharing 2 key/value heads (grouped-query attention, as in the real models).
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    initializer_range=0.5,
    tie_word_embeddings=False,
    # No special tokens: a random model would stop at random places; tests that need an eos pass eos_token_id=...
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def tiny_config(arch: str = "llama", *, vocab_size: int = 64, **overrides: Any) -> Any:
    """The transformers config of a tiny model of `arch` (see ARCHS); overrides replace any field."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    if arch == "llama":
        fields = dict(_COMMON, num_hidden_layers=2)
        cls = LlamaConfig
    elif arch == "qwen2":  # biases on q/k/v, unlike llama
        fields = dict(_COMMON, num_hidden_layers=2)
        cls = Qwen2Config
    elif arch == "gemma3":
        # Layers 0 and 2 see only the last 16 positions, so prompts longer than 16 exercise sliding-window masks
        # in verification; layer 1 and 3 attend to everything. query_pre_attn_scalar = head_dim is the usual
        # 1/sqrt(head_dim) attention scaling.
        fields = dict(
            _COMMON,
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            sliding_window=16,
            query_pre_attn_scalar=16,
            hidden_activation="gelu_pytorch_tanh",
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
        )
        cls = Gemma3TextConfig
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    fields.update(vocab_size=vocab_size, **overrides)
    return cls(**fields)


def tiny_model(
    arch: str = "llama",
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    **overrides: Any,
) -> Model:
    """A tiny float32 random-weight causal LM of `arch` on CPU, eval mode, no gradients; same seed, same weights.

    vocab_size defaults to 64, or to len(tokenizer) when a tokenizer is given. Without a tokenizer,
    Model.tokenizer is None and tests feed token ids. Overrides go to the config (e.g. num_hidden_layers=3,
    eos_token_id=5, initializer_range=0.1). The global torch RNG is left as it was.
    """
    from transformers import AutoModelForCausalLM

    from leapdecode.models.load import eos_token_ids

    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 64
    elif tokenizer is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = tiny_config(arch, vocab_size=vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    hf_model.eval()
    hf_model.requires_grad_(False)
    return Model(hf_model=hf_model, tokenizer=tokenizer, name=f"tiny-{arch}-v{vocab_size}-s{seed}",
                 eos_token_ids=eos_token_ids(hf_model, tokenizer))
