"""Reader for Gemma 3 text models (Gemma3ForCausalLM, e.g. Gemma 3 270M).

What sets Gemma 3 apart from the Llama family, and how the fast forward reproduces it:
- RMSNorm multiplies by (1 + weight) in float32 and casts back: the weights are stored here as float32 (1 + w);
- "sandwich" norms: each sublayer's output is normalised again (post_attention / post_feedforward) before the
  residual add;
- embeddings are scaled by sqrt(hidden) rounded to the model dtype;
- q and k are RMS-normalised per head (QK-norm) before the rotary embedding;
- GELU (tanh approximation) gates the MLP;
- local layers see a sliding window of keys and use their own RoPE base; global layers see everything;
- the attention scale is query_pre_attn_scalar ** -0.5, not head_dim ** -0.5.
"""

from __future__ import annotations

from typing import Any

import torch

from leapdecode.models.fast.weights import LayerWeights, Spec, Weights, common_problems, linear_parts, rope_problem, \
    rope_table

MODEL_TYPES = ("gemma3_text",)


def unsupported_reason(hf_model: Any, config: Any) -> str | None:
    problem = common_problems(hf_model, config)
    if problem:
        return problem
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if getattr(config, "attention_bias", False):
        return "attention biases"
    layer_types = list(getattr(config, "layer_types", None) or [])
    if set(layer_types) - {"full_attention", "sliding_attention"} or len(layer_types) != config.num_hidden_layers:
        return f"attention layer types {sorted(set(layer_types))}"
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    for layer_type in set(layer_types):
        problem = rope_problem((config.rope_parameters or {}).get(layer_type))
        if problem:
            return problem
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
        if inv_freq is None or inv_freq.numel() * 2 != config.head_dim:
            return f"no full-head rotary embedding for {layer_type} layers"
    return None


def _norm(module: Any) -> torch.Tensor:
    return 1.0 + module.weight.detach().float()  # [dim] float32: Gemma multiplies by (1 + w) in float32


@torch.no_grad()
def read(hf_model: Any, config: Any) -> tuple[Spec, Weights]:
    decoder = hf_model.model
    embed = decoder.embed_tokens.weight.detach()
    dtype, device = embed.dtype, embed.device
    types = sorted(set(config.layer_types))  # rope table index: position of the layer type in this list
    spec = Spec(
        family="gemma3",
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab_size=int(hf_model.get_output_embeddings().weight.shape[0]),
        max_positions=int(config.max_position_embeddings),
        eps=float(config.rms_norm_eps),
        attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
        activation=config.hidden_activation,
        windows=tuple(int(config.sliding_window) if t == "sliding_attention" else None for t in config.layer_types),
        rope_of_layer=tuple(types.index(t) for t in config.layer_types),
        embed_scale=True,
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )
    layers = []
    for block in decoder.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv, qkv_bias = linear_parts(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up, gate_up_bias = linear_parts(mlp.gate_proj, mlp.up_proj)
        q_norm = _norm(attn.q_norm).expand(spec.n_heads, -1)  # [heads, head_dim]
        k_norm = _norm(attn.k_norm).expand(spec.n_kv_heads, -1)  # [kv, head_dim]
        layers.append(LayerWeights(
            attn_norm=_norm(block.input_layernorm),
            qkv=qkv, qkv_bias=qkv_bias,
            o=attn.o_proj.weight.detach(), o_bias=None,
            mlp_norm=_norm(block.pre_feedforward_layernorm),
            gate_up=gate_up, gate_up_bias=gate_up_bias,
            down=mlp.down_proj.weight.detach(), down_bias=None,
            qk_norm=torch.cat([q_norm, k_norm]).contiguous(),  # [heads + kv, head_dim]
            post_attn_norm=_norm(block.post_attention_layernorm),
            post_mlp_norm=_norm(block.post_feedforward_layernorm),
        ))
    rotary = decoder.rotary_emb
    rope = [rope_table(getattr(rotary, f"{t}_inv_freq"), float(getattr(rotary, f"{t}_attention_scaling")),
                       spec.max_positions, dtype, device) for t in types]
    weights = Weights(
        embed=embed,
        embed_scale=decoder.embed_tokens.embed_scale.detach().to(dtype),  # sqrt(hidden) rounded as transformers does
        layers=layers,
        final_norm=_norm(decoder.norm),
        lm_head=hf_model.get_output_embeddings().weight.detach(),
        rope=rope,
    )
    return spec, weights
