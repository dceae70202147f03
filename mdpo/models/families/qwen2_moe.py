"""Qwen2-MoE (`Qwen2MoeForCausalLM`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen 2's attention (q/k/v bias, GQA) with
Qwen3-MoE's routed experts (router `mlp.gate`, experts `mlp.experts.E.{gate,up,down}_proj` of `moe_intermediate_size`,
softmax top `num_experts_per_tok`, renormalised when `norm_topk_prob`; dense layers by `mlp_only_layers` /
`decoder_sparse_step`) plus, in every MoE layer, a shared expert: a SwiGLU MLP `mlp.shared_expert.{gate,up,down}_proj`
of `shared_expert_intermediate_size` that every token runs, scaled by sigmoid(x `mlp.shared_expert_gate`^T) ([1,
hidden]) and added to the routed output. That is Megatron's SharedExpertMLP with its gate (`moe_shared_expert_gate`):
`linear_fc1` = [gate; up], `linear_fc2`, `gate_weight`."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2MoeConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import SHARED_EXPERT, Refusal, preset
from mdpo.models.families.llama import llama_layout_family
from mdpo.models.families.qwen2 import LAYER_TENSORS, write_windows
from mdpo.models.families.qwen2 import REFUSALS as QWEN2_REFUSALS
from mdpo.models.families.qwen2 import read_config as read_qwen2
from mdpo.models.families.qwen3_moe import MOE_TENSORS as ROUTED_TENSORS
from mdpo.models.families.qwen3_moe import read_experts, write_experts

MOE_TENSORS = (
    *ROUTED_TENSORS,
    (
        SHARED_EXPERT + "linear_fc1.weight",
        ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
        "gate_up",
    ),
    (SHARED_EXPERT + "linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",), "copy"),
    (SHARED_EXPERT + "gate_weight", ("mlp.shared_expert_gate.weight",), "copy"),
)

REFUSALS = (
    Refusal("qkv_bias", lambda bias: not bias, "q/k/v without biases"),
    Refusal("shared_expert_intermediate_size", lambda width: not width, "MoE layers without their shared expert"),
    *QWEN2_REFUSALS,
)


def layer_kinds(hf: dict) -> list[str]:
    """Each layer's attention as transformers 5 reads a Qwen2-MoE config.json: its `layer_types`, else (Qwen2MoeConfig's
    own rule, not Qwen 2's) a window on every other layer from the first below `max_window_layers`."""
    below = hf.get("max_window_layers", 28)
    every = range(hf.get("num_hidden_layers", 0))
    return hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 and i < below else "full_attention" for i in every
    ]


def read_config(hf: dict) -> dict[str, Any]:
    return (
        read_qwen2(hf | {"layer_types": layer_kinds(hf)})
        | read_experts(hf, default_topk=4)
        | {"shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 5632)}
    )


def write_extra(model: ModelConfig) -> dict[str, Any]:
    """Qwen2-MoE's keys past Llama's: the windows (with `layer_types`, so its own default rule never applies), the
    routed experts and the shared expert's width."""
    shared = {"shared_expert_intermediate_size": model.shared_expert_intermediate_size}
    return write_windows(model) | write_experts(model) | shared


# Qwen2-MoE's config.json past the counts: q/k/v biases, softmax top-k unrenormalised, load-balancing loss 0.001;
# every layer's MLP is `num_experts` SwiGLU experts of moe_intermediate_size beside a gated shared expert
_EXPERTS = dict(qkv_bias=True, norm_topk_prob=False, router_aux_loss_coef=0.001)
_A2_7B = dict(num_experts=60, moe_topk=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632)
_A14B = dict(num_experts=64, moe_topk=8, moe_intermediate_size=2560, shared_expert_intermediate_size=20480)
PRESETS = {
    "qwen1.5-moe-a2.7b": preset(2048, 5632, 24, 16, 16, 151936, **_EXPERTS, **_A2_7B),
    "qwen2-57b-a14b": preset(3584, 18944, 28, 28, 4, 151936, **_EXPERTS, **_A14B),
}

FAMILY = llama_layout_family(
    Qwen2MoeConfig,
    "qwen2_moe",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # as Qwen 2's
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
)
