"""Reader for the Llama family: Llama, Mistral, Qwen2 and SmolLM2 (RMSNorm, RoPE, GQA, SwiGLU, tied or untied head).

Differences inside the family that the forward honours: q/k/v biases (Qwen2), MLP biases, the head dimension,
RoPE theta and static scaling (linear, llama3, yarn: the inverse frequencies are read from the model's own rotary
module, so every scaling transformers applies at load time is reproduced), and sliding windows (Mistral's
config.sliding_window on every layer; Qwen2's per-layer layer_types).
"""

from __future__ import annotations

from typing import Any

import torch

from leapdecode.models.fast.weights import (LayerWeights, Spec, Weights, bias_of, common_problems, linear_parts,
                                            rope_problem, rope_table)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def unsupported_reason(hf_model: Any, config: Any) -> str | None:
    problem = common_problems(hf_model, config) or rope_problem(getattr(config, "rope_parameters", None))
    if problem:
        return problem
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return f"partial rotary embeddings (partial_rotary_factor={config.partial_rotary_factor})"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types - {"full_attention", "sliding_attention"}:
        return f"attention layer types {sorted(layer_types)}"
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding module at model.rotary_emb"
    if rotary.inv_freq.numel() * 2 != _head_dim(config):
        return "rotary embeddings over part of the head"
    return None


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _windows(config: Any) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # Qwen2 and newer configs say per layer
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if config.model_type == "mistral" and window:  # Mistral: every layer slides when a window is set
        return (int(window),) * config.num_hidden_layers
    return (None,) * config.num_hidden_layers


@torch.no_grad()
def read(hf_model: Any, config: Any) -> tuple[Spec, Weights]:
    decoder = hf_model.model
    embed = decoder.embed_tokens.weight.detach()
    dtype, device = embed.dtype, embed.device
    head_dim = _head_dim(config)
    spec = Spec(
        family="llama",
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=int(hf_model.get_output_embeddings().weight.shape[0]),
        max_positions=int(config.max_position_embeddings),
        eps=float(config.rms_norm_eps),
        attn_scale=head_dim ** -0.5,
        activation=config.hidden_act,
        windows=_windows(config),
        rope_of_layer=(0,) * config.num_hidden_layers,
        embed_scale=False,
        final_softcap=None,
    )
    layers = []
    for block in decoder.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv, qkv_bias = linear_parts(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up, gate_up_bias = linear_parts(mlp.gate_proj, mlp.up_proj)
        layers.append(LayerWeights(
            attn_norm=block.input_layernorm.weight.detach(),
            qkv=qkv, qkv_bias=qkv_bias,
            o=attn.o_proj.weight.detach(), o_bias=bias_of(attn.o_proj),
            mlp_norm=block.post_attention_layernorm.weight.detach(),
            gate_up=gate_up, gate_up_bias=gate_up_bias,
            down=mlp.down_proj.weight.detach(), down_bias=bias_of(mlp.down_proj),
        ))
    rotary = decoder.rotary_emb
    rope = rope_table(rotary.inv_freq, float(rotary.attention_scaling), spec.max_positions, dtype, device)
    weights = Weights(
        embed=embed,
        embed_scale=torch.ones((), dtype=dtype, device=device),
        layers=layers,
        final_norm=decoder.norm.weight.detach(),
        lm_head=hf_model.get_output_embeddings().weight.detach(),
        rope=[rope],
    )
    return spec, weights
