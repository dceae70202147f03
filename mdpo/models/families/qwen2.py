"""Qwen 2 / 2.5 (`Qwen2ForCausalLM`): Llama's layout with a bias on q, k and v (always: the class has no switch),
GQA, RoPE base 1e6, tied embeddings for 0.5B-3B. Sliding-window attention (`use_sliding_window`, off in every
published config) is refused."""

from __future__ import annotations

from transformers import Qwen2Config

from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import llama_layout_family, read_llama_like

QKV_BIAS = (
    (
        "self_attention.linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
    ),
)
LAYER_TENSORS = LLAMA_LAYER_TENSORS + QKV_BIAS


def refuse_sliding_window(hf: dict) -> None:
    """Qwen's `use_sliding_window` (and transformers 5's per-layer `layer_types`) would limit some layers'
    attention; mdpo attends whole sequences."""
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
        raise ValueError("use_sliding_window=true (sliding-window attention)")


def read_config(hf: dict) -> dict:
    refuse_sliding_window(hf)
    return {**read_llama_like(hf), "qkv_bias": True}


FAMILY = llama_layout_family(
    Qwen2Config, "qwen2", LAYER_TENSORS, read_config, lambda model: {"use_sliding_window": False}
)
