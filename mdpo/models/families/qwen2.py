"""Qwen 2 / 2.5 (`Qwen2ForCausalLM`): Llama's layout with a bias on q, k and v (always: the class has no switch),
GQA, RoPE base 1e6, tied embeddings for 0.5B-3B. Sliding-window attention (`use_sliding_window`, off in every
published config) is refused."""

from __future__ import annotations

from transformers import Qwen2Config

from mdpo.models.families.base import Refusal, preset
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import REFUSALS as LLAMA_REFUSALS
from mdpo.models.families.llama import llama_layout_family, read_llama_like

QKV_BIAS = (
    (
        "self_attention.linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
    ),
)
LAYER_TENSORS = LLAMA_LAYER_TENSORS + QKV_BIAS

# Qwen's `use_sliding_window` (and transformers 5's per-layer `layer_types`) would limit some layers' attention;
# mdpo attends whole sequences
SLIDING_WINDOW = (
    Refusal("use_sliding_window", bool, "sliding-window attention"),
    Refusal("layer_types", lambda types: "sliding_attention" in (types or ()), "sliding-window attention"),
)
REFUSALS = SLIDING_WINDOW + LLAMA_REFUSALS


def read_config(hf: dict) -> dict:
    return {**read_llama_like(hf), "qkv_bias": True}


PRESETS = {
    "qwen2.5-7b": preset(3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
    "qwen2.5-14b": preset(5120, 13824, 48, 40, 8, 152064, qkv_bias=True),
    "qwen2.5-32b": preset(5120, 27648, 64, 40, 8, 152064, qkv_bias=True),
    "qwen2.5-72b": preset(8192, 29568, 80, 64, 8, 152064, qkv_bias=True),
}

# tulu2: Qwen's own format (ChatML) is its tokenizer's chat template, which `auto` takes when present
FAMILY = llama_layout_family(
    Qwen2Config,
    "qwen2",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",
    write_extra=lambda model: {"use_sliding_window": False},
)
