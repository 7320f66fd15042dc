"""What the fast runner needs from a transformers model: a frozen shape description and plain weight tensors.

The fast runner does not call the transformers modules; it reads their weights once (fusing q/k/v into one matrix
and gate/up into another, so a layer does two input projections instead of five) and runs its own forward
(forward.py). Each supported family has a small reader (llama.py, gemma3.py) that checks the config and returns a
Spec and Weights. `unsupported_reason` says in words why a model cannot run here, so callers can fall back to the
Hugging Face runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from leapdecode.models.fast.cpu import CpuLinear

# rope types whose inverse frequencies do not depend on the sequence length (dynamic and longrope do)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "gelu_fast")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Spec:
    """Shapes and numerics of a decoder-only transformer, as the fast forward runs it."""

    family: str  # "llama" (Llama, Mistral, Qwen2, SmolLM2) or "gemma3"
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eps: float  # RMSNorm epsilon
    attn_scale: float  # multiplies q.k
    activation: str  # MLP gate activation, one of ACTIVATIONS
    windows: tuple[int | None, ...]  # [n_layers] a key is seen while q_pos - k_pos < window; None = every key
    rope_of_layer: tuple[int, ...]  # [n_layers] index into Weights.rope
    embed_scale: bool  # multiply embeddings by Weights.embed_scale (Gemma)
    final_softcap: float | None  # logits = cap * tanh(logits / cap) (Gemma 2 style), None = off

    def __post_init__(self) -> None:
        if self.family not in ("llama", "gemma3"):
            raise ValueError(f"family must be 'llama' or 'gemma3', got {self.family!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if len(self.windows) != self.n_layers or len(self.rope_of_layer) != self.n_layers:
            raise ValueError("windows and rope_of_layer need one entry per layer")

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_heads(self) -> int:
        """Heads in the fused q/k/v projection output: n_heads + 2 * n_kv_heads."""
        return self.n_heads + 2 * self.n_kv_heads


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden] RMSNorm weight, already in the form the forward multiplies by
    qkv: torch.Tensor  # [(n_heads + 2 kv) * head_dim, hidden] fused q, k, v projections
    qkv_bias: torch.Tensor | None  # [(n_heads + 2 kv) * head_dim] (Qwen2)
    o: torch.Tensor  # [hidden, n_heads * head_dim]
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden] fused gate and up projections
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None
    # Gemma 3 only
    qk_norm: torch.Tensor | None = None  # [n_heads + kv, head_dim] float32, per-head RMSNorm weight of q then k
    post_attn_norm: torch.Tensor | None = None  # [hidden]
    post_mlp_norm: torch.Tensor | None = None  # [hidden]
    # the CPU layouts of qkv, o, gate_up and down (CPU only, see add_cpu_layouts)
    qkv_cpu: CpuLinear | None = None
    o_cpu: CpuLinear | None = None
    gate_up_cpu: CpuLinear | None = None
    down_cpu: CpuLinear | None = None


@dataclass
class Weights:
    embed: torch.Tensor  # [vocab, hidden]
    embed_scale: torch.Tensor  # [] scalar in the model dtype (1 when unused)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden] (the embedding itself when tied)
    rope: list[torch.Tensor]  # each [max_positions, 2, head_dim]: cos and sign-folded sin, in the model dtype
    lm_head_cpu: CpuLinear | None = None  # CPU only, see add_cpu_layouts
    cpu_attention: bool = False  # decode and verify attention through attend.c (CPU only, see add_cpu_layouts)
    # without attend.c, several sequences attend in one SDPA call per layer (forward.PaddedBatch): None = off the CPU
    padded_attention: bool | None = None


def add_cpu_layouts(weights: Weights, kernel: bool = True, attention: bool = True) -> None:
    """Give every projection its CPU layouts (cpu.CpuLinear): faster steps, above all several-row verify steps,
    for one or two more copies of the projection weights. kernel=False: torch's products only (no skinny kernel).
    attention=True: decode and verify steps attend through attend.c where it builds (False: torch's SDPA)."""
    weights.cpu_attention = attention
    for layer in weights.layers:
        layer.qkv_cpu, layer.o_cpu = CpuLinear.of(layer.qkv, kernel), CpuLinear.of(layer.o, kernel)
        layer.gate_up_cpu, layer.down_cpu = CpuLinear.of(layer.gate_up, kernel), CpuLinear.of(layer.down, kernel)
    weights.lm_head_cpu = CpuLinear.of(weights.lm_head, kernel)


def text_config(hf_model: Any) -> Any:
    config = hf_model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def unsupported_reason(hf_model: Any) -> str | None:
    """None when the fast runner can run `hf_model`, else why not (in words, for a fallback message)."""
    from leapdecode.models.fast import gemma3, llama

    config = text_config(hf_model)
    model_type = getattr(config, "model_type", None)
    if model_type in llama.MODEL_TYPES:
        return llama.unsupported_reason(hf_model, config)
    if model_type in gemma3.MODEL_TYPES:
        return gemma3.unsupported_reason(hf_model, config)
    supported = ", ".join(llama.MODEL_TYPES + gemma3.MODEL_TYPES)
    return f"model type {model_type!r} has no fast forward (supported: {supported})"


def extract(hf_model: Any) -> tuple[Spec, Weights]:
    """Spec and fused weights of a supported model, on its device and in its dtype. ValueError if unsupported."""
    from leapdecode.models.fast import gemma3, llama

    reason = unsupported_reason(hf_model)
    if reason is not None:
        raise ValueError(f"the fast runner cannot run this model: {reason}")
    config = text_config(hf_model)
    reader = gemma3 if config.model_type in gemma3.MODEL_TYPES else llama
    return reader.read(hf_model, config)


# ---------------------------------------------------------------------------------------------- shared helpers


def common_problems(hf_model: Any, config: Any) -> str | None:
    """Checks every family shares: dtype, heads, activation."""
    dtype = next(hf_model.parameters()).dtype
    if dtype not in DTYPES:
        return f"dtype {dtype} (supported: float32, bfloat16, float16)"
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % kv:
        return f"{heads} attention heads do not split evenly over {kv} key/value heads"
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if act not in ACTIVATIONS:
        return f"activation {act!r} (supported: {', '.join(ACTIVATIONS)})"
    return None


def rope_problem(rope_parameters: dict | None) -> str | None:
    rope_type = (rope_parameters or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} (supported: {', '.join(STATIC_ROPE_TYPES)})"
    return None


def rope_table(inv_freq: torch.Tensor, scaling: float, max_positions: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """[max_positions, 2, head_dim]: row p holds cos(p * f) and the sign-folded sin, cast to `dtype`.

    Computed as transformers does (float32 angles, cos/sin times the attention scaling, then cast), so the rotary
    factors are bit-identical to the reference. The sin half that multiplies the first half of the head is negated:
    rotate_half(x) * sin == flip_halves(x) * signed_sin, which lets the forward rotate with one flip and one addcmul.
    """
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.to(device=device, dtype=torch.float32))  # [P, head_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [P, head_dim]
    cos, sin = angles.cos() * scaling, angles.sin() * scaling
    half = inv_freq.numel()
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return torch.stack([cos, sin], dim=1).to(dtype)  # [P, 2, head_dim]


def linear_parts(*modules: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fuse nn.Linear modules along the output dimension: weight [sum(out), in], bias or None."""
    weight = torch.cat([m.weight.detach() for m in modules], dim=0).contiguous()
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat([b.detach() if b is not None else torch.zeros(m.weight.shape[0], dtype=weight.dtype,
                                                                   device=weight.device)
                      for b, m in zip(biases, modules)])
    return weight, bias


def bias_of(module: Any) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()
