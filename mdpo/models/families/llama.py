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

from mdpo.config import ROPE_PARAMETERS, ROPE_REQUIRED, ModelConfig
from mdpo.models.families.base import Entry, Family, Refusal, preset

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
REFUSALS = (
    Refusal("attention_bias", bool),
    Refusal("mlp_bias", bool),
    Refusal("hidden_act", lambda act: act != "silu"),
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
ROPE_TYPES = ("default", *ROPE_PARAMETERS)


def _rope_fields(hf: dict) -> dict[str, Any]:
    """rope_theta and the scaling of either config.json layout; a rope type mdpo does not run, or a scaling without
    one of its required parameters, is a ValueError naming it."""
    params: dict[str, Any] = {}
    for source in (hf.get("rope_parameters"), hf.get("rope_scaling")):
        if isinstance(source, dict):
            params.update(source)
    fields = {"rope_theta": hf.get("rope_theta", params.get("rope_theta"))}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r}", f"rope types: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return fields
    keys = ROPE_PARAMETERS[rope_type]
    missing = [key for key in list(keys)[: ROPE_REQUIRED[rope_type]] if params.get(key) is None]
    if missing:
        raise ValueError(f"rope_type={rope_type!r} without '{missing[0]}'")
    return fields | {"rope_scaling": rope_type, **{field: params[key] for key, field in keys.items() if key in params}}


def read_llama_like(hf: dict) -> dict[str, Any]:
    """The ModelConfig fields of a Llama-layout config.json (no biases, SwiGLU: `REFUSALS`, checked before); ValueError
    names a RoPE scaling that mdpo's model cannot follow."""
    fields = {name: hf[name] for name in _SAME_KEYS if hf.get(name) is not None}
    fields.update(_rope_fields(hf))
    heads, hidden = fields.get("num_attention_heads"), fields.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and fields.get("head_dim") == hidden // heads:
        del fields["head_dim"]  # the default: one description per model, however config.json spells it
    return {k: v for k, v in fields.items() if v is not None}


def read_layer_types(hf: dict, config_class: type[PretrainedConfig]) -> dict[str, Any]:
    """The windows and RoPEs of a family whose layers have types (OLMo 3, Gemma 3), read through transformers' own
    config class so that every version's config.json reads alike (`layer_types` or a window pattern; a RoPE per
    type, or `rope_scaling` with a local base): the window on the layers typed `sliding_attention`, the full layers'
    RoPE the model's, the window layers' own (unscaled) `model.window_rope_theta` where it differs."""
    config = config_class(**{key: value for key, value in hf.items() if key not in ("architectures", "model_type")})
    full, sliding = config.rope_parameters["full_attention"], config.rope_parameters["sliding_attention"]
    if sliding.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention={sliding!r} (a scaled RoPE on the window layers)")
    fields = _rope_fields({"rope_parameters": full})
    windowed = [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
    if not windowed or config.sliding_window is None:
        return fields
    every = len(windowed) == len(config.layer_types)
    fields |= {"sliding_window": config.sliding_window, "sliding_window_layers": None if every else windowed}
    if sliding["rope_theta"] != full["rope_theta"] or "rope_scaling" in fields:
        fields["window_rope_theta"] = sliding["rope_theta"]
    return fields


def write_layer_types(model: ModelConfig) -> dict[str, Any]:
    """The config.json keys `read_layer_types` reads: the window, every layer's type and a RoPE per type."""
    windowed = model.window_layers()
    kinds = ["sliding_attention" if i in windowed else "full_attention" for i in range(model.num_hidden_layers)]
    full = {"rope_type": model.rope_scaling or "default", "rope_theta": model.rope_theta, **model.rope_parameters()}
    window = full
    if model.window_rope_theta is not None:
        window = {"rope_type": "default", "rope_theta": model.window_rope_theta}
    rope = {"full_attention": full, "sliding_attention": window}
    return {"sliding_window": model.sliding_window, "layer_types": kinds, "rope_parameters": rope}


def write_llama_like(config_class: type[PretrainedConfig], model: ModelConfig, **extra: Any) -> dict:
    """A complete config.json from transformers' own config class of the family (it writes rope_theta and scaling
    where its version keeps them)."""
    rope = {"rope_type": model.rope_scaling or "default", **model.rope_parameters()}
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
    read_fields: Callable[[dict], dict],
    *,
    refusals: tuple[Refusal, ...],
    presets: dict[str, dict[str, Any]],
    default_template: str,
    write_extra: Callable[[ModelConfig], dict[str, Any]] = lambda model: {},
    moe_tensors: tuple[Entry, ...] = (),
    architecture: str | None = None,
    carries_extra_layers: bool = False,
) -> Family:
    """A family on Llama's tensor names, whose config.json is transformers' `config_class` (architecture, model_type
    and the oracle, transformers' own class, from it): its layer table (and a MoE layer's MLP rows), its config
    reader, what its config.json adds to Llama's keys, and the rest of its record; `architecture` where the class is
    not named after its config (Gemma3TextConfig's Gemma3ForCausalLM); `carries_extra_layers`: `Family`'s."""
    architecture = architecture or config_class.__name__.replace("Config", "ForCausalLM")
    return Family(
        name=name,
        architectures=(architecture,),
        model_type=config_class.model_type,
        global_tensors=GLOBAL_TENSORS,
        layer_tensors=layer_tensors,
        hf_layer_prefix="model.layers.{i}.",
        read_fields=read_fields,
        write_config=lambda model: write_llama_like(
            config_class, model, architectures=[architecture], **write_extra(model)
        ),
        oracle=architecture,
        default_template=default_template,
        refusals=refusals,
        presets=presets,
        ignored_suffixes=("rotary_emb.inv_freq",),
        moe_tensors=moe_tensors,
        carries_extra_layers=carries_extra_layers,
    )


# published configs: Llama 2 (and Code Llama, Tulu 2), Llama 3.x (and Tulu 3), TinyLlama
PRESETS = {
    "llama2-7b": preset(4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": preset(5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": preset(8192, 28672, 80, 64, 8, 32000),
    "codellama-34b": preset(8192, 22016, 48, 64, 8, 32000),
    "tulu2-13b": preset(5120, 13824, 40, 40, 40, 32000),
    "tulu2-70b": preset(8192, 28672, 80, 64, 8, 32000),
    "llama3.2-1b": preset(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    "llama3.2-3b": preset(3072, 8192, 28, 24, 8, 128256, tie_word_embeddings=True),
    "llama3.1-8b": preset(4096, 14336, 32, 32, 8, 128256),
    "llama3.1-70b": preset(8192, 28672, 80, 64, 8, 128256),
    "tulu3-8b": preset(4096, 14336, 32, 32, 8, 128256),
    "tulu3-70b": preset(8192, 28672, 80, 64, 8, 128256),
    "tinyllama-1.1b": preset(2048, 5632, 22, 32, 4, 32000),
}

# tulu2: the format of the Llama 2 based Tulu 2 models (Llama 3's own format is its tokenizer's chat template)
FAMILY = llama_layout_family(
    LlamaConfig, "llama", LAYER_TENSORS, read_llama_like, refusals=REFUSALS, presets=PRESETS, default_template="tulu2"
)
