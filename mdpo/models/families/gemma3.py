"""Gemma 3 (`Gemma3ForCausalLM`: 1B, and the text-only checkpoints of 4B-27B): Llama's tensors with four norms a layer
(before and after attention and the MLP: `model.norm_position: both`), every RMSNorm scaling by 1 + w
(`model.zero_centered_norms`), per-head q/k norms, a GeGLU MLP (`gelu_pytorch_tanh`), input embeddings times
sqrt(hidden), scores scaled by 1 / sqrt(query_pre_attn_scalar), tied embeddings, and 5 sliding-window layers to 1
global, each type with its own RoPE (local base 10,000 unscaled; global base 1,000,000, linear factor 8 from 4B on).
Soft-capped attention or logits (Gemma 2's) and bidirectional attention are refused. The published 4B-27B
(`Gemma3ForConditionalGeneration`) are the same text model beside a vision tower, which mdpo carries untrained."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import Gemma3Config, Gemma3TextConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import Refusal, preset
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import (
    REFUSALS as LLAMA_REFUSALS,
)
from mdpo.models.families.llama import (
    llama_layout_family,
    read_layer_types,
    read_llama_like,
    write_layer_types,
)
from mdpo.models.families.olmo2 import POST_NORMS
from mdpo.models.families.qwen3 import QK_NORMS

LAYER_TENSORS = (
    *(row for row in LLAMA_LAYER_TENSORS if not row[0].startswith("pre_mlp_layernorm")),
    ("pre_mlp_layernorm.weight", ("pre_feedforward_layernorm.weight",), "copy"),
    *QK_NORMS,
    *POST_NORMS,
)
REFUSALS = (
    *(refusal for refusal in LLAMA_REFUSALS if refusal.key != "hidden_act"),
    Refusal("hidden_activation", lambda act: act != "gelu_pytorch_tanh"),
    Refusal("attn_logit_softcapping", lambda cap: cap is not None, "soft-capped attention scores"),
    Refusal("final_logit_softcapping", lambda cap: cap is not None, "soft-capped logits"),
    Refusal("use_bidirectional_attention", bool, "mdpo trains causal models"),
)
GEMMA = {
    "qk_norm": True,
    "norm_position": "both",
    "zero_centered_norms": True,
    "hidden_act": "gelu_pytorch_tanh",
    "scale_embeddings": True,
}


def read_config(hf: dict) -> dict:
    """The text model's fields, read through transformers' Gemma3TextConfig: a multimodal checkpoint's text_config
    lists only what differs from its defaults (the head size, heads, RoPE bases, ...)."""
    given = {key: value for key, value in hf.items() if key not in ("architectures", "model_type")}
    full = Gemma3TextConfig(**given).to_dict()
    return {
        **read_llama_like(full),
        **read_layer_types(full, Gemma3TextConfig),
        **GEMMA,
        # explicit, whatever hidden / heads is: Gemma's default head size is 256, not hidden / heads
        "head_dim": full["head_dim"],
        "query_pre_attn_scalar": full["query_pre_attn_scalar"],
    }


def write_extra(model: ModelConfig) -> dict[str, Any]:
    return write_layer_types(model) | {
        "hidden_activation": model.hidden_act,
        "query_pre_attn_scalar": model.query_pre_attn_scalar,
    }


def read_multimodal(hf: dict) -> dict:
    """Gemma3ForConditionalGeneration's text model (its text_config, Gemma 3's refusals applied to it)."""
    return FAMILY.read_config(hf.get("text_config") or {})


def write_multimodal(model: ModelConfig) -> dict:
    """A Gemma3ForConditionalGeneration config.json around the text model (the vision tower's config transformers'
    default, Gemma 3's: an export keeps its source's config.json, which `hf_export_config` prefers)."""
    text = {key: value for key, value in FAMILY.write_config(model).items() if key != "architectures"}
    return Gemma3Config(text_config=text, architectures=["Gemma3ForConditionalGeneration"]).to_dict()


def _gemma3(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, **fields: Any) -> dict:
    """A Gemma 3 preset: its 5 window layers to 1 global, the window's RoPE base 10,000."""
    windowed = [i for i in range(layers) if (i + 1) % 6]
    window = dict(sliding_window=1024, sliding_window_layers=windowed, window_rope_theta=10000.0)
    return preset(hidden, ffn, layers, heads, kv_heads, vocab, **GEMMA, tie_word_embeddings=True, **window | fields)


# published configs (4B-27B: the text model of Gemma3ForConditionalGeneration, the vision tower not counted)
PRESETS = {
    "gemma-3-1b": _gemma3(1152, 6912, 26, 4, 1, 262144, head_dim=256, query_pre_attn_scalar=256, sliding_window=512),
    "gemma-3-4b": _gemma3(2560, 10240, 34, 8, 4, 262208, head_dim=256, query_pre_attn_scalar=256),
    "gemma-3-12b": _gemma3(3840, 15360, 48, 16, 8, 262208, head_dim=256, query_pre_attn_scalar=256),
    "gemma-3-27b": _gemma3(5376, 21504, 62, 32, 16, 262208, head_dim=128, query_pre_attn_scalar=168),
}

FAMILY = llama_layout_family(
    Gemma3TextConfig,
    "gemma3",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # Gemma's own turn format is its tokenizer's chat template
    write_extra=write_extra,
    architecture="Gemma3ForCausalLM",
)

# Gemma 3 4B-27B as published: the text model under `language_model.`, beside a vision tower and its projector, which
# mdpo carries untrained from the source folder into every export
MULTIMODAL = dataclasses.replace(
    FAMILY,
    name="gemma3_multimodal",
    architectures=("Gemma3ForConditionalGeneration",),
    model_type="gemma3",
    global_tensors=(
        ("embedding.word_embeddings.weight", ("language_model.model.embed_tokens.weight",), "vocab"),
        ("decoder.final_layernorm.weight", ("language_model.model.norm.weight",), "copy"),
        ("output_layer.weight", ("language_model.lm_head.weight",), "vocab"),
    ),
    hf_layer_prefix="language_model.model.layers.{i}.",
    read_fields=read_multimodal,
    write_config=write_multimodal,
    oracle="Gemma3ForConditionalGeneration",
    refusals=(),  # the text model's, inside read_multimodal
    presets={},  # the text model's counts are the gemma3 presets'
    carried=("vision_tower.", "multi_modal_projector."),
)
