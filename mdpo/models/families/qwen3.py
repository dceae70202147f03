"""Qwen 3 dense (`Qwen3ForCausalLM`): Llama's layout without biases plus an RMSNorm of every query and key head
(`q_norm` / `k_norm`, one [head_dim] weight each, applied before RoPE: Megatron's `qk_layernorm`), an explicit
`head_dim` that need not be hidden / heads (0.6B: 1024 / 16 heads, head_dim 128), tied embeddings for 0.6B-4B."""

from __future__ import annotations

from transformers import Qwen3Config

from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import llama_layout_family, read_llama_like
from mdpo.models.families.qwen2 import refuse_sliding_window

QK_NORMS = (
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
)
LAYER_TENSORS = LLAMA_LAYER_TENSORS + QK_NORMS


def read_config(hf: dict) -> dict:
    refuse_sliding_window(hf)
    return {**read_llama_like(hf), "qk_norm": True}


FAMILY = llama_layout_family(
    Qwen3Config, "qwen3", LAYER_TENSORS, read_config, lambda model: {"use_sliding_window": False}
)
