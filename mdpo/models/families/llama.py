"""Llama 2 / Tulu 2 and Llama 3.x / Tulu 3 (`LlamaForCausalLM`): separate q/k/v (GQA), gate/up/down, RMSNorm, RoPE
(Llama 3.1+ with its `llama3` frequency scaling), tied embeddings for Llama 3.2 1B/3B.

`read_llama_like` / `write_llama_like` read and write the config.json keys that Llama shares with the families
built on its layout (Qwen 2 / 2.5, Qwen 3, Mistral), whatever transformers version wrote them: rope_theta at the top
(transformers 4) or nested in `rope_parameters` (transformers 5), scaling in `rope_scaling` or `rope_parameters`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import LlamaConfig, PretrainedConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import Entry, Family

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
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)
ROPE_TYPES = ("default", "llama3")
# Llama 3's rope_scaling keys -> ModelConfig fields
_LLAMA3_KEYS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_position_embeddings",
}


def _rope_fields(hf: dict) -> dict[str, Any]:
    """rope_theta and the scaling of either config.json layout; a rope type other than default/llama3 or a llama3
    scaling without one of its four parameters is a ValueError naming it."""
    params: dict[str, Any] = {}
    for source in (hf.get("rope_parameters"), hf.get("rope_scaling")):
        if isinstance(source, dict):
            params.update(source)
    fields = {"rope_theta": hf.get("rope_theta", params.get("rope_theta"))}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r}", f"rope types: {', '.join(ROPE_TYPES)}")
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_KEYS if key not in params]
        if missing:
            raise ValueError(f"rope_type='llama3' without '{missing[0]}'")
        fields.update(rope_scaling="llama3", **{field: params[key] for key, field in _LLAMA3_KEYS.items()})
    return fields


def read_llama_like(hf: dict) -> dict[str, Any]:
    """The ModelConfig fields of a Llama-layout config.json (no biases, SwiGLU); ValueError names a key that mdpo's
    model cannot follow."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}")
    fields = {name: hf[name] for name in _SAME_KEYS if hf.get(name) is not None}
    fields.update(_rope_fields(hf))
    heads, hidden = fields.get("num_attention_heads"), fields.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and fields.get("head_dim") == hidden // heads:
        del fields["head_dim"]  # the default: one description per model, however config.json spells it
    return {k: v for k, v in fields.items() if v is not None}


def write_llama_like(config_class: type[PretrainedConfig], model: ModelConfig, **extra: Any) -> dict:
    """A complete config.json from transformers' own config class of the family (it writes rope_theta and scaling
    where its version keeps them)."""
    rope = {"rope_type": "default"}
    if model.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", **{key: getattr(model, field) for key, field in _LLAMA3_KEYS.items()}}
    config = config_class(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.kv_heads,
        rms_norm_eps=model.rms_norm_eps,
        rope_theta=model.rope_theta,
        rope_scaling={**rope, "rope_theta": model.rope_theta},
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=model.tie_word_embeddings,
        **({"head_dim": model.head_dim} if model.head_dim else {}),
        **extra,
    )
    return config.to_dict()


def llama_layout_family(
    config_class: type[PretrainedConfig],
    name: str,
    layer_tensors: tuple[Entry, ...],
    read_config: Callable[[dict], dict],
    write_extra: Callable[[ModelConfig], dict[str, Any]] = lambda model: {},
    moe_tensors: tuple[Entry, ...] = (),
) -> Family:
    """A family on Llama's tensor names, whose config.json is transformers' `config_class` (architecture and
    model_type from it): its layer table (and a MoE layer's MLP rows), its config reader, and what its config.json
    adds to Llama's keys."""
    architecture = config_class.__name__.replace("Config", "ForCausalLM")
    return Family(
        name=name,
        architecture=architecture,
        model_type=config_class.model_type,
        global_tensors=GLOBAL_TENSORS,
        layer_tensors=layer_tensors,
        hf_layer_prefix="model.layers.{i}.",
        read_config=read_config,
        write_config=lambda model: write_llama_like(
            config_class, model, architectures=[architecture], **write_extra(model)
        ),
        ignored_suffixes=("rotary_emb.inv_freq",),
        moe_tensors=moe_tensors,
    )


FAMILY = llama_layout_family(LlamaConfig, "llama", LAYER_TENSORS, read_llama_like)
