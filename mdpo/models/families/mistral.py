"""Mistral (`MistralForCausalLM`: 7B v0.1-v0.3, Nemo 12B): Llama's tensors and math with an explicit `head_dim`
(Nemo: 128 with hidden 5120 and 32 heads) and v0.1's `sliding_window` of 4096 on every layer (`model.sliding_window`,
applied exactly in every row layout: docs/model-families.md)."""

from __future__ import annotations

from transformers import MistralConfig

from mdpo.models.families.base import preset
from mdpo.models.families.llama import LAYER_TENSORS, REFUSALS, llama_layout_family, read_llama_like


def read_config(hf: dict) -> dict:
    fields = read_llama_like(hf)
    if hf.get("sliding_window") is not None:
        fields["sliding_window"] = hf["sliding_window"]
    return fields


PRESETS = {"mistral-nemo-12b": preset(5120, 14336, 40, 32, 8, 131072, head_dim=128)}

FAMILY = llama_layout_family(
    MistralConfig,
    "mistral",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # Mistral's own [INST] format is its tokenizer's chat template
    write_extra=lambda model: {"sliding_window": model.sliding_window},
)
