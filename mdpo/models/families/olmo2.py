"""OLMo 2 (`Olmo2ForCausalLM`, 1B-32B) and OLMo 3 (`Olmo3ForCausalLM`, 7B / 32B): Llama's tensors with the norms moved
after attention and the MLP (`post_attention_layernorm` and `post_feedforward_layernorm` on each sublayer's output
before its residual add, no norm before: `model.norm_position: post`) and an RMSNorm over the whole query and the
whole key projection, all heads together (`q_norm` [heads x head_dim], `k_norm` [kv heads x head_dim]:
`model.qk_norm_span: projection`, its statistics summed over the TP ranks). OLMo 3 adds sliding windows on 3 of every
4 layers (`layer_types`) and a RoPE per layer type: its long-context yarn on the full layers only."""

from __future__ import annotations

from typing import Any

from transformers import Olmo2Config, Olmo3Config

from mdpo.config import ModelConfig
from mdpo.models.families.base import preset
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import REFUSALS, llama_layout_family, read_llama_like
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
    """OLMo 2's fields with OLMo 3's windows (`layer_types`, default 3 sliding : 1 full) and RoPEs: one per layer type
    in transformers 5's config.json (`rope_parameters` by type), the full layers' the model's RoPE and the window
    layers' unscaled one `model.window_rope_theta`; transformers 4's `rope_scaling` is the full layers' alone."""
    params = dict(hf.get("rope_parameters") or {})
    full = params.get("full_attention") or {}
    sliding = params.get("sliding_attention") or {"rope_type": "default"}
    if sliding.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention={sliding!r} (a scaled RoPE on the window layers)")
    flat = {key: value for key, value in hf.items() if key != "rope_parameters"}
    if full:
        flat["rope_parameters"] = full
    fields = read_config(flat)
    window_theta = sliding.get("rope_theta", hf.get("rope_theta", fields.get("rope_theta")))
    if "rope_scaling" in fields or window_theta != fields.get("rope_theta"):
        fields["window_rope_theta"] = window_theta
    layers = hf.get("num_hidden_layers", 0)
    types = hf.get("layer_types") or Olmo3Config(num_hidden_layers=layers).layer_types
    windowed = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if windowed and hf.get("sliding_window") is not None:
        fields |= {"sliding_window": hf["sliding_window"], "sliding_window_layers": windowed}
        if len(windowed) == layers:
            fields["sliding_window_layers"] = None
    elif "window_rope_theta" in fields:
        del fields["window_rope_theta"]  # no window layers: the full layers' RoPE is every layer's
    return fields


def write_olmo3(model: ModelConfig) -> dict[str, Any]:
    """OLMo 3's window keys (its size and every layer's type) and the window layers' RoPE."""
    windowed = model.window_layers()
    kinds = ["sliding_attention" if i in windowed else "full_attention" for i in range(model.num_hidden_layers)]
    full = {"rope_type": model.rope_scaling or "default", "rope_theta": model.rope_theta, **model.rope_parameters()}
    window_theta = model.rope_theta if model.window_rope_theta is None else model.window_rope_theta
    window = {"rope_type": "default", "rope_theta": window_theta}
    rope = {"full_attention": full, "sliding_attention": window if model.window_rope_theta is not None else full}
    return {"sliding_window": model.sliding_window, "layer_types": kinds, "rope_parameters": rope}


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
    write_extra=write_olmo3,
)
