"""DeepSeek-V2 (`DeepseekV2ForCausalLM`: DeepSeek-V2, V2-Lite, V2.5): DeepSeek-V3's layers and tensor names
(`deepseek_v3`: multi-latent attention, its RoPE on interleaved pairs, dense layers first, routed and ungated shared
experts) with V2's router: a softmax over every expert, the top `num_experts_per_tok` (`greedy`), or within the best
`topk_group` of `n_group` groups scored by their best expert (`group_limited_greedy`), unrenormalised, times
`routed_scaling_factor`, and no score bias. That is Megatron-Core's softmax router taken before the top k
(`moe_router_pre_softmax`) with its grouping where a group's score, the sum of its top num_experts_per_tok //
topk_group experts, is its best one's (`read_groups`)."""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV2Config

from mdpo.config import ModelConfig
from mdpo.models.families.base import Refusal
from mdpo.models.families.deepseek_v3 import (
    LAYER_TENSORS,
    MOE_TENSORS,
    read_groups,
    read_latent_model,
    write_latent_model,
)
from mdpo.models.families.llama import llama_layout_family

METHODS = ("greedy", "group_limited_greedy")
REFUSALS = (
    Refusal("attention_bias", bool, "Megatron-Core's MLA projections have no biases"),
    Refusal("mlp_bias", bool),
    Refusal("hidden_act", lambda act: act != "silu"),
    Refusal("norm_topk_prob", bool, "transformers' DeepseekV2ForCausalLM never renormalises the top-k scores"),
    Refusal("scoring_func", lambda score: score != "softmax", "DeepSeek-V2's router is softmax"),
    Refusal("topk_method", lambda method: method not in METHODS, f"top-k methods: {', '.join(METHODS)}"),
    Refusal("moe_layer_freq", lambda freq: freq != 1, "experts in every layer past first_k_dense_replace"),
)


def read_config(hf: dict) -> dict[str, Any]:
    """DeepSeek-V2's: the keys V3 shares, a softmax router unrenormalised, groups scored by their best expert."""
    config = DeepseekV2Config(**{key: value for key, value in hf.items() if key not in ("architectures", "model_type")})
    groups = read_groups(config, scored_by=1) if config.topk_method == "group_limited_greedy" else {}
    return read_latent_model(config) | groups | {"norm_topk_prob": False, "router_score": "softmax"}


def write_extra(model: ModelConfig) -> dict[str, Any]:
    method = "group_limited_greedy" if model.router_groups else "greedy"
    return write_latent_model(model) | {"topk_method": method}


FAMILY = llama_layout_family(
    DeepseekV2Config,
    "deepseek_v2",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets={},
    default_template="tulu2",
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
)
