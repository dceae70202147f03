"""Qwen 3 dense (`Qwen3ForCausalLM`): Llama's layout without biases plus an RMSNorm of every query and key head
(`q_norm` / `k_norm`, one [head_dim] weight each, applied before RoPE: Megatron's `qk_layernorm`), an explicit
`head_dim` that need not be hidden / heads (0.6B: 1024 / 16 heads, head_dim 128), tied embeddings for 0.6B-4B."""

from __future__ import annotations

from transformers import Qwen3Config

from mdpo.models.families.base import Family
from mdpo.models.families.llama import GLOBAL_TENSORS, read_llama_like, write_llama_like
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.qwen2 import refuse_sliding_window

QK_NORMS = (
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
)
LAYER_TENSORS = LLAMA_LAYER_TENSORS + QK_NORMS


def read_config(hf: dict) -> dict:
    refuse_sliding_window(hf)
    return {**read_llama_like(hf), "qk_norm": True}


FAMILY = Family(
    name="qwen3",
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    global_tensors=GLOBAL_TENSORS,
    layer_tensors=LAYER_TENSORS,
    hf_layer_prefix="model.layers.{i}.",
    read_config=read_config,
    write_config=lambda model: write_llama_like(
        Qwen3Config, model, architectures=["Qwen3ForCausalLM"], use_sliding_window=False
    ),
    ignored_suffixes=("rotary_emb.inv_freq",),
)
