"""OLMo 2 (`Olmo2ForCausalLM`, 1B-32B) and OLMo 3 (`Olmo3ForCausalLM`, 7B / 32B): Llama's tensors with the norms moved
after attention and the MLP (`post_attention_layernorm` and `post_feedforward_layernorm` on each sublayer's output
before its residual add, no norm before: `model.norm_position: post`) and an RMSNorm over the whole query and the
whole key projection, all heads together (`q_norm` [heads x head_dim], `k_norm` [kv heads x head_dim]:
`model.qk_norm_span: projection`, its statistics summed over the TP ranks). OLMo 3 adds sliding windows on 3 of every
4 layers (`layer_types`) and a RoPE per layer type: its long-context yarn on the full layers only."""

from __future__ import annotations

from typing import Any

from transformers import Olmo2Config, Olmo3Config

from mdpo.models.families.base import preset
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import (
    REFUSALS,
    llama_layout_family,
    read_layer_types,
    read_llama_like,
    write_layer_types,
)
from mdpo.models.families.qwen3 import QK_NORMS

POST_NORMS = (
    ("post_self_attn_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("post_mlp_layernorm.weight", ("post_feedforward_layernorm.weight",), "copy"),
)
LAYER_TENSORS = (
    tuple(row for row in LLAMA_LAYER_TENSORS if not row[0].endswith("layernorm.weight")) + QK_NORMS + POST_NORMS
)
NORMS = {"qk_norm": True, "qk_norm_span": "projection", "norm_position": "post"}


def read_config(hf: dict) -> dict:
    return {**read_llama_like(hf), **NORMS}


def read_olmo3_config(hf: dict) -> dict:
    """OLMo 2's fields with OLMo 3's windows (default: 3 sliding to 1 full layer) and a RoPE per layer type."""
    return {**read_config(hf), **read_layer_types(hf, Olmo3Config)}


def _olmo3(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """An OLMo 3 preset: its 4096-token window on every layer but each fourth."""
    windowed = [i for i in range(layers) if (i + 1) % 4]
    return preset(
        hidden, ffn, layers, heads, kv_heads, 100278, **NORMS, sliding_window=4096, sliding_window_layers=windowed
    )


PRESETS = {
    "olmo-2-7b": preset(4096, 11008, 32, 32, 32, 100352, **NORMS),
    "olmo-2-13b": preset(5120, 13824, 40, 40, 40, 100352, **NORMS),
    "olmo-2-32b": preset(5120, 27648, 64, 40, 8, 100352, **NORMS),
}
OLMO3_PRESETS = {"olmo-3-7b": _olmo3(4096, 11008, 32, 32, 32), "olmo-3-32b": _olmo3(5120, 27648, 64, 40, 8)}

# tulu3: OLMo 2 Instruct's format (Tulu 3's); OLMo 3's own is its tokenizer's chat template, which `auto` takes
FAMILY = llama_layout_family(
    Olmo2Config,
    "olmo2",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu3",
)
OLMO3_FAMILY = llama_layout_family(
    Olmo3Config,
    "olmo3",
    LAYER_TENSORS,
    read_olmo3_config,
    refusals=REFUSALS,
    presets=OLMO3_PRESETS,
    default_template="tulu3",
    write_extra=write_layer_types,
)
