"""GLM-4.5 (`Glm4MoeForCausalLM`: GLM-4.5, GLM-4.6, GLM-4.5-Air): Llama's layout with DeepSeek-V3's experts.

- Attention: separate q/k/v with biases (`attention_bias`: Megatron's add_qkv_bias; `o_proj` has none), GQA, an
  explicit `head_dim` (96 heads of 128 on a hidden size of 5120), optionally an RMSNorm of each query and key head
  before RoPE (`use_qk_norm`: Megatron's qk_layernorm), and RoPE on the first `partial_rotary_factor` of each head's
  dims only (0.5: the first 64 of 128, rotate_half within them, the rest unrotated), which is Megatron's
  `rotary_percent` (`model.partial_rotary_factor`). transformers' config class puts 0.5 there when config.json says
  nothing.
- MLP: DeepSeek-V3's, under the same tensor names (`deepseek_v3.MOE_TENSORS`): dense in the first
  `first_k_dense_replace` layers, then a sigmoid router `mlp.gate` whose scores plus
  `mlp.gate.e_score_correction_bias` choose the top `num_experts_per_tok` of `n_routed_experts` (within the best
  `topk_group` of `n_group` groups, a group scored by its two best experts), the chosen scores renormalised and
  times `routed_scaling_factor`, beside `n_shared_experts` x moe_intermediate_size of ungated shared expert. The
  correction bias is Megatron's router `expert_bias`, loaded and used, never updated (`models.moe`).
- Multi-token prediction layers (`num_nextn_predict_layers`: `model.layers.{num_hidden_layers}.*`) are carried
  untrained into the export, as DeepSeek-V3's are.

What Megatron-Core cannot follow is refused: see REFUSALS and `deepseek_v3.read_groups`.
"""

from __future__ import annotations

from typing import Any

from transformers import Glm4MoeConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import Refusal, preset
from mdpo.models.families.deepseek_v3 import (
    MOE_TENSORS,
    RENORMALISED,
    SIGMOID_ROUTING,
    read_experts,
    read_groups,
    write_experts,
)
from mdpo.models.families.llama import llama_layout_family, read_llama_like
from mdpo.models.families.qwen2 import LAYER_TENSORS as BIASED_LAYER_TENSORS
from mdpo.models.families.qwen3 import QK_NORMS

LAYER_TENSORS = BIASED_LAYER_TENSORS + QK_NORMS  # the biases and norms where the model has them

REFUSALS = (Refusal("hidden_act", lambda act: act != "silu"), RENORMALISED)


def read_config(hf: dict) -> dict[str, Any]:
    """GLM-4.5's, read through transformers' config class (its defaults filled in: partial_rotary_factor 0.5):
    Llama's keys, the biases, q/k norms and partial RoPE (ValueError with yarn), DeepSeek-V3's experts and sigmoid
    router (groups scored by their top 2)."""
    config = Glm4MoeConfig(**{key: value for key, value in hf.items() if key not in ("architectures", "model_type")})
    fields = read_llama_like(config.to_dict())
    rotary = config.rope_parameters.get("partial_rotary_factor", 1.0)
    if rotary != 1.0 and fields.get("rope_scaling") == "yarn":
        raise ValueError(
            f"partial_rotary_factor={rotary!r} with rope_type='yarn'",
            "yarn's attention factor scales the rotated dims only, mdpo's the whole head",
        )
    attention = {"qkv_bias": config.attention_bias, "qk_norm": config.use_qk_norm, "partial_rotary_factor": rotary}
    return fields | attention | read_experts(config) | read_groups(config, scored_by=2) | SIGMOID_ROUTING


def write_extra(model: ModelConfig) -> dict[str, Any]:
    """GLM-4.5's keys past Llama's: the attention's switches and partial RoPE, DeepSeek-V3's experts' keys."""
    attention = {"attention_bias": model.qkv_bias, "use_qk_norm": model.qk_norm}
    return attention | {"partial_rotary_factor": model.partial_rotary_factor} | write_experts(model)


def _glm(layers: int, dense: int, width: int, **fields: Any) -> dict[str, Any]:
    """What GLM-4.5's published configs share past the counts: 96 heads of 128, half of each rotated (RoPE base
    1e6), q/k/v biases, the sigmoid router with its score bias over experts of `width` after the first `dense`
    layers, top 8, one ungated shared expert."""
    return dict(
        head_dim=128,
        qkv_bias=True,
        partial_rotary_factor=0.5,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        moe_topk=8,
        moe_intermediate_size=width,
        moe_layers=list(range(dense, layers)),
        shared_expert_intermediate_size=width,
        shared_expert_gate=False,
        **SIGMOID_ROUTING,
        **fields,
    )


PRESETS = {
    # GLM-4.5 (GLM-4.6 has its layers), published as 355B-A32B (transformers counts 352.8B, 33.6B active, without
    # the MTP layer); 160 experts, q/k norms, three dense layers
    "glm-4.5-355b": preset(
        5120,
        12288,
        92,
        96,
        8,
        151552,
        **_glm(92, 3, 1536, num_experts=160, qk_norm=True, routed_scaling_factor=2.5),
    ),
    # GLM-4.5-Air, published as 106B-A12B (106.9B, 13.4B active); 128 experts, one dense layer
    "glm-4.5-air-106b": preset(4096, 10944, 46, 96, 8, 151552, **_glm(46, 1, 1408, num_experts=128)),
}

FAMILY = llama_layout_family(
    Glm4MoeConfig,
    "glm4_moe",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # GLM-4.5's own format is its tokenizer's chat template, which `auto` takes
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
    carries_extra_layers=True,  # its multi-token prediction layers (`num_nextn_predict_layers`), untrained
)
