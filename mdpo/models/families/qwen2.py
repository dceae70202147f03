"""Qwen 2 / 2.5 (`Qwen2ForCausalLM`): Llama's layout with a bias on q, k and v (always: the class has no switch),
GQA, RoPE base 1e6, tied embeddings for 0.5B-3B. Sliding-window attention (`use_sliding_window`, off in the
published configs) on the layers from `max_window_layers` on, or those transformers 5's `layer_types` names."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config

from mdpo.config import ModelConfig
from mdpo.models.families.base import preset
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

REFUSALS = LLAMA_REFUSALS


def read_windows(hf: dict) -> dict[str, Any]:
    """Qwen's sliding window as transformers reads it: with `use_sliding_window` and a `sliding_window`, on the
    layers `layer_types` marks `sliding_attention`, else on those from `max_window_layers` (default 28) on."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return {}
    layers, types = hf.get("num_hidden_layers", 0), hf.get("layer_types")
    if types:
        windowed = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    else:
        windowed = list(range(hf.get("max_window_layers", 28), layers))
    if not windowed:
        return {}
    return {
        "sliding_window": hf["sliding_window"],
        "sliding_window_layers": None if len(windowed) == layers else windowed,
    }


def write_windows(model: ModelConfig) -> dict[str, Any]:
    """The config.json keys of Qwen's sliding window (transformers 5 writes `layer_types` too)."""
    windowed = model.window_layers()
    kinds = ["sliding_attention" if i in windowed else "full_attention" for i in range(model.num_hidden_layers)]
    return {
        "use_sliding_window": bool(windowed),
        "sliding_window": model.sliding_window,
        "max_window_layers": windowed[0] if windowed else model.num_hidden_layers,
        "layer_types": kinds,
    }


def read_config(hf: dict) -> dict:
    return {**read_llama_like(hf), **read_windows(hf), "qkv_bias": True}


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
    write_extra=write_windows,
)
