"""Qwen 3 dense (`Qwen3ForCausalLM`): Llama's layout without biases plus an RMSNorm of every query and key head
(`q_norm` / `k_norm`, one [head_dim] weight each, applied before RoPE: Megatron's `qk_layernorm`), an explicit
`head_dim` that need not be hidden / heads (0.6B: 1024 / 16 heads, head_dim 128), tied embeddings for 0.6B-4B.
The worked example of docs/adding-a-family.md."""

from __future__ import annotations

from transformers import Qwen3Config

from mdpo.models.families.base import preset
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import llama_layout_family, read_llama_like
from mdpo.models.families.qwen2 import REFUSALS, read_windows, write_windows

QK_NORMS = (
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
)
LAYER_TENSORS = LLAMA_LAYER_TENSORS + QK_NORMS


def read_config(hf: dict) -> dict:
    return {**read_llama_like(hf), **read_windows(hf), "qk_norm": True}


PRESETS = {
    "qwen3-0.6b": preset(1024, 3072, 28, 16, 8, 151936, head_dim=128, qk_norm=True, tie_word_embeddings=True),
    "qwen3-8b": preset(4096, 12288, 36, 32, 8, 151936, qk_norm=True),
    "qwen3-14b": preset(5120, 17408, 40, 40, 8, 151936, qk_norm=True),
    "qwen3-32b": preset(5120, 25600, 64, 64, 8, 151936, head_dim=128, qk_norm=True),
}

FAMILY = llama_layout_family(
    Qwen3Config,
    "qwen3",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,  # Qwen 2's (Llama's); its sliding window read as Qwen 2's
    presets=PRESETS,
    default_template="tulu2",  # Qwen 3's own format (ChatML with thinking) is its tokenizer's chat template
    write_extra=write_windows,
)
