"""Supported model families, their aliases, and the canonical tensor names.

One table maps what a checkpoint calls itself (HF ``model_type`` or GGUF ``general.architecture``)
to the family whose code runs it. Everything else in the package speaks only canonical family names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from exo_rknpu.errors import UnsupportedModelError

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")

# model_type -> family. mistral is llama-shaped only without sliding-window attention (checked below).
_ALIASES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "llama",
}

# LayerWeights field -> HF tensor name suffix after "model.layers.{i}.".
HF_LAYER_TENSORS: dict[str, str] = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
HF_BIAS_TENSORS: dict[str, str] = {
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
}
# Per-head RMSNorm weights on q and k (qwen3), [head_dim] each.
HF_QK_NORM_TENSORS: dict[str, str] = {
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_HEAD = "lm_head.weight"

# LayerWeights field -> GGUF tensor name suffix after "blk.{i}.".
GGUF_LAYER_TENSORS: dict[str, str] = {
    "input_norm": "attn_norm.weight",
    "q_proj": "attn_q.weight",
    "k_proj": "attn_k.weight",
    "v_proj": "attn_v.weight",
    "o_proj": "attn_output.weight",
    "post_norm": "ffn_norm.weight",
    "gate_proj": "ffn_gate.weight",
    "up_proj": "ffn_up.weight",
    "down_proj": "ffn_down.weight",
}
GGUF_BIAS_TENSORS: dict[str, str] = {
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
}
# llama.cpp's names for them (gguf-py constants: ATTN_Q_NORM / ATTN_K_NORM).
GGUF_QK_NORM_TENSORS: dict[str, str] = {
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
}
GGUF_EMBED = "token_embd.weight"
GGUF_NORM = "output_norm.weight"
GGUF_HEAD = "output.weight"


def hf_layer_name(layer: int, field: str) -> str:
    """HF tensor name of `field` (a LayerWeights field) in decoder layer `layer`."""
    suffix = HF_LAYER_TENSORS.get(field) or HF_BIAS_TENSORS.get(field) or HF_QK_NORM_TENSORS[field]
    return f"model.layers.{layer}.{suffix}"


def gguf_layer_name(layer: int, field: str) -> str:
    """GGUF tensor name of `field` (a LayerWeights field) in block `layer`."""
    suffix = GGUF_LAYER_TENSORS.get(field) or GGUF_BIAS_TENSORS.get(field) or GGUF_QK_NORM_TENSORS[field]
    return f"blk.{layer}.{suffix}"


def has_attention_bias(family: str) -> bool:
    """qwen2 has q/k/v biases; llama does not."""
    return family == "qwen2"


def has_qk_norm(family: str) -> bool:
    """qwen3 normalises each head of q and k (RMSNorm over head_dim) before RoPE."""
    return family == "qwen3"


def canonical_family(model_type: str | None, config: Mapping[str, Any] | None = None) -> str:
    """Map an HF model_type / GGUF architecture to a supported family ("llama", "qwen2" or "qwen3").

    `config` (the HF config dict) lets aliases that are only sometimes compatible be checked:
    mistral runs as llama only when it has no sliding window.
    Raises UnsupportedModelError naming the supported families.
    """
    key = (model_type or "").strip().lower()
    family = _ALIASES.get(key)
    if family is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_names())}"
        )
    if key == "mistral" and config is not None and config.get("sliding_window") is not None:
        raise UnsupportedModelError(
            f"mistral with sliding_window={config.get('sliding_window')} is not supported "
            "(sliding-window attention is not implemented); only mistral without a sliding window runs as llama"
        )
    return family


def supported_names() -> list[str]:
    """Every accepted model_type, families first (for error messages and docs)."""
    return list(FAMILIES) + sorted(k for k in _ALIASES if k not in FAMILIES)
