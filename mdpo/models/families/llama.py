"""Llama 2 / Tulu 2 (`LlamaForCausalLM`): separate q/k/v (GQA), gate/up/down, RMSNorm, RoPE, untied head."""

from __future__ import annotations

from transformers import LlamaConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import Family

GLOBAL_TENSORS = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "vocab"),
)
LAYER_TENSORS = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    (
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
_SAME_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
)


def read_config(hf: dict) -> dict:
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if hf.get(flag):
            raise ValueError(f"{flag}=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 nests rope_theta here
    for params in (rope, hf.get("rope_scaling") or {}):
        rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else params
        if rope_type not in (None, "default"):
            raise ValueError(f"rope scaling {rope_type!r}")
    heads, head_dim, hidden = hf.get("num_attention_heads"), hf.get("head_dim"), hf.get("hidden_size")
    if isinstance(head_dim, int) and isinstance(heads, int) and isinstance(hidden, int) and head_dim * heads != hidden:
        raise ValueError(f"head_dim={head_dim} (hidden_size/num_attention_heads != head_dim)")
    fields = {name: hf[name] for name in _SAME_KEYS if name in hf}
    if "rope_theta" not in fields and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    return fields


def write_config(model: ModelConfig) -> dict:
    """A complete config.json, from transformers' own LlamaConfig."""
    return LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads or model.num_attention_heads,
        rms_norm_eps=model.rms_norm_eps,
        rope_theta=model.rope_theta,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    ).to_dict()


FAMILY = Family(
    name="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    global_tensors=GLOBAL_TENSORS,
    layer_tensors=LAYER_TENSORS,
    hf_layer_prefix="model.layers.{i}.",
    read_config=read_config,
    write_config=write_config,
    ignored_suffixes=("rotary_emb.inv_freq",),
)
