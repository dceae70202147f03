"""DeepSeek-V3 (`DeepseekV3ForCausalLM`: DeepSeek V3 / V3.1 / R1, Kimi K2, Moonlight): multi-latent attention and a
mixture of experts with a shared expert, on Megatron-Core's own layers.

- Attention (`models.mla`, Megatron's MLASelfAttention): the query through `q_a_proj` (q_lora_rank), its norm
  `q_a_layernorm` and `q_b_proj`, or one `q_proj` without q_lora_rank; keys and values from one latent,
  `kv_a_proj_with_mqa` (kv_lora_rank, then the heads' shared RoPE key of qk_rope_head_dim), its norm `kv_a_layernorm`
  and `kv_b_proj` (per head: the key's qk_nope_head_dim, the value's v_head_dim); `o_proj`. transformers'
  `rope_interleave` de-interleaves the RoPE dims before rotating them, as Megatron's MLA does: the weights map as
  they are. RoPE plain or yarn (its mscale / mscale_all_dim in the cos / sin and the softmax scale).
- MLP: dense in the first `first_k_dense_replace` layers, then a router `mlp.gate` whose sigmoid scores plus
  `mlp.gate.e_score_correction_bias` choose the top `num_experts_per_tok` of `n_routed_experts` experts within the
  best `topk_group` of `n_group` groups (a group scored by its two best experts), the chosen scores renormalised
  and times `routed_scaling_factor`; beside them `n_shared_experts` x moe_intermediate_size of shared expert,
  ungated. The correction bias is Megatron's router `expert_bias`: frozen as loaded, or moved after each step by
  `model.router_bias_update_rate` (`models.moe`).

What Megatron-Core cannot follow is refused: see REFUSALS and `read_config`.
"""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV3Config, PretrainedConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import EXPERT, SHARED_EXPERT, Refusal, preset
from mdpo.models.families.llama import llama_layout_family, read_llama_like

ATTENTION = "self_attention."
LAYER_TENSORS = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    (ATTENTION + "linear_q_proj.weight", ("self_attn.q_proj.weight",), "copy"),  # without q_lora_rank
    (ATTENTION + "linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), "copy"),
    (ATTENTION + "q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), "copy"),
    (ATTENTION + "linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), "copy"),
    (ATTENTION + "linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",), "copy"),
    (ATTENTION + "kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), "copy"),
    (ATTENTION + "linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), "copy"),
    (ATTENTION + "linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
MOE_TENSORS = (
    ("mlp.router.weight", ("mlp.gate.weight",), "copy"),
    ("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), "copy"),
    (EXPERT + "linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "gate_up"),
    (EXPERT + "linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), "copy"),
    (
        SHARED_EXPERT + "linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        "gate_up",
    ),
    (SHARED_EXPERT + "linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), "copy"),
)

# DeepSeek-V3's router (and GLM-4.5's): sigmoid scores, the correction bias choosing the experts, renormalised
SIGMOID_ROUTING = {"norm_topk_prob": True, "router_score": "sigmoid", "router_expert_bias": True}
RENORMALISED = Refusal(
    "norm_topk_prob", lambda norm: not norm, "Megatron-Core always renormalises sigmoid top-k scores"
)


REFUSALS = (
    Refusal("attention_bias", bool, "Megatron-Core's MLA projections have no biases"),
    Refusal("hidden_act", lambda act: act != "silu"),
    Refusal("rope_interleave", lambda interleave: not interleave, "Megatron-Core's MLA de-interleaves RoPE dims"),
    RENORMALISED,
    Refusal("scoring_func", lambda score: score != "sigmoid", "DeepSeek-V3's router is sigmoid"),
    Refusal("topk_method", lambda method: method != "noaux_tc", "DeepSeek-V3's routing is noaux_tc"),
    Refusal("moe_layer_freq", lambda freq: freq != 1, "experts in every layer past first_k_dense_replace"),
)


def read_latent_model(config: PretrainedConfig) -> dict[str, Any]:
    """What DeepSeek-V2 and V3 configs share, read through transformers' config class (its defaults filled in):
    Llama's keys (RoPE: plain or yarn), MLA's and the experts' counts; ValueError names a RoPE or a yarn mscale
    Megatron-Core's MLA computes otherwise."""
    fields = read_llama_like(config.to_dict())
    for key in ("head_dim", "num_key_value_heads"):  # MLA's head sizes are its own; its keys and values per head
        fields.pop(key, None)
    if fields.get("rope_scaling") not in (None, "yarn"):
        raise ValueError(f"rope_type={fields['rope_scaling']!r}", "MLA's RoPE: default or yarn")
    rope = config.rope_parameters
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if fields.get("rope_scaling") and not (mscale and mscale_all_dim) and (mscale_all_dim or mscale not in (None, 1)):
        raise ValueError(f"rope_parameters mscale={mscale!r} with mscale_all_dim={mscale_all_dim!r}")
    return (
        fields
        | {
            "kv_lora_rank": config.kv_lora_rank,
            "q_lora_rank": config.q_lora_rank,
            "qk_nope_head_dim": config.qk_nope_head_dim,
            "qk_rope_head_dim": config.qk_rope_head_dim,
            "v_head_dim": config.v_head_dim,
        }
        | read_experts(config)
    )


def read_experts(config: PretrainedConfig) -> dict[str, Any]:
    """DeepSeek's experts (which GLM-4.5 shares): `n_routed_experts` of `moe_intermediate_size` past the first
    `first_k_dense_replace` layers, `n_shared_experts` of that width side by side as one ungated shared expert, the
    routed weights times `routed_scaling_factor`."""
    layers, dense = config.num_hidden_layers, config.first_k_dense_replace or 0
    shared = config.n_shared_experts or 0
    experts = config.n_routed_experts or None  # 0: no routed experts, a dense model
    return {
        "num_experts": experts,
        "moe_topk": config.num_experts_per_tok,
        "moe_intermediate_size": config.moe_intermediate_size,
        "moe_layers": list(range(dense, layers)) if dense and experts else None,
        "shared_expert_intermediate_size": shared * config.moe_intermediate_size if shared else None,
        "shared_expert_gate": False,
        "routed_scaling_factor": config.routed_scaling_factor,
    }


def read_groups(config: PretrainedConfig, scored_by: int) -> dict[str, Any]:
    """The groups of experts, which Megatron-Core scores by their top num_experts_per_tok // topk_group experts:
    exact where transformers scores them by their top `scored_by` (or every group is chosen); ValueError else."""
    topk, groups, chosen = config.num_experts_per_tok, config.n_group or 1, config.topk_group or 1
    if groups == 1 or chosen >= groups:
        return {"router_groups": None, "router_group_topk": None}
    if topk // chosen != scored_by:
        raise ValueError(
            f"n_group={groups} with topk_group={chosen} and num_experts_per_tok={topk}",
            "Megatron-Core scores a group by its top num_experts_per_tok // topk_group experts, transformers by its "
            f"top {scored_by}",
        )
    return {"router_groups": groups, "router_group_topk": chosen}


def read_config(hf: dict) -> dict[str, Any]:
    """DeepSeek-V3's: the shared keys, its sigmoid router with the score bias, groups scored by their top 2."""
    config = DeepseekV3Config(**{key: value for key, value in hf.items() if key not in ("architectures", "model_type")})
    return read_latent_model(config) | read_groups(config, scored_by=2) | SIGMOID_ROUTING


def write_latent_model(model: ModelConfig) -> dict[str, Any]:
    """The keys past Llama's that DeepSeek-V2 and V3 share: MLA's sizes and the experts' (`write_experts`)."""
    return {
        "kv_lora_rank": model.kv_lora_rank,
        "q_lora_rank": model.q_lora_rank,
        "qk_nope_head_dim": model.qk_nope_head_dim,
        "qk_rope_head_dim": model.qk_rope_head_dim,
        "v_head_dim": model.v_head_dim,
    } | write_experts(model)


def write_experts(model: ModelConfig) -> dict[str, Any]:
    """Inverse of `read_experts` and `read_groups`: the experts' keys (the dense layers first), the routing's."""
    experts = set(model.expert_layers())
    shared = model.shared_expert_intermediate_size
    return {
        "n_routed_experts": model.num_experts or 0,
        "num_experts_per_tok": model.moe_topk,
        "moe_intermediate_size": model.expert_width,
        "first_k_dense_replace": min(experts, default=model.num_hidden_layers),
        "n_shared_experts": shared // model.expert_width if shared else 0,
        "norm_topk_prob": model.norm_topk_prob,
        "routed_scaling_factor": model.routed_scaling_factor,
        "n_group": model.router_groups or 1,
        "topk_group": model.router_group_topk or 1,
    }


def write_extra(model: ModelConfig) -> dict[str, Any]:
    return write_latent_model(model) | {"rope_interleave": True}


def _deepseek(layers: int, dense: int, shared: int, **fields: Any) -> dict[str, Any]:
    """What DeepSeek-V3's published configs share past the counts: MLA's sizes (q_lora_rank apart), the sigmoid
    router with its score bias, experts after the first `dense` layers, `shared` shared experts ungated."""
    width = fields["moe_intermediate_size"]
    return dict(
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        moe_layers=list(range(dense, layers)),
        shared_expert_intermediate_size=shared * width,
        shared_expert_gate=False,
        router_score="sigmoid",
        router_expert_bias=True,
        **fields,
    )


_YARN = dict(rope_scaling="yarn", rope_original_max_position_embeddings=4096, rope_mscale=1.0, rope_mscale_all_dim=1.0)
PRESETS = {
    # DeepSeek V3 / V3.1 / R1: 671B total, 37B active; 256 experts, top 8 within the best 4 of 8 groups
    "deepseek-v3-671b": preset(
        7168,
        18432,
        61,
        128,
        128,
        129280,
        **_deepseek(61, 3, 1, q_lora_rank=1536, num_experts=256, moe_topk=8, moe_intermediate_size=2048),
        routed_scaling_factor=2.5,
        router_groups=8,
        router_group_topk=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=163840,
        **_YARN,
        rope_scaling_factor=40.0,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
    ),
    # Kimi K2: 1T total, 32B active; 384 experts, top 8, ungrouped
    "kimi-k2-1t": preset(
        7168,
        18432,
        61,
        64,
        64,
        163840,
        **_deepseek(61, 1, 1, q_lora_rank=1536, num_experts=384, moe_topk=8, moe_intermediate_size=2048),
        routed_scaling_factor=2.827,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        **_YARN,
        rope_scaling_factor=32.0,
        rope_beta_fast=1.0,
        rope_beta_slow=1.0,
    ),
    # Moonlight: 16B total, 3B active; queries without a low-rank projection, 64 experts, top 6, 2 shared
    "moonlight-16b-a3b": preset(
        2048,
        11264,
        27,
        16,
        16,
        163840,
        **_deepseek(27, 1, 2, q_lora_rank=None, num_experts=64, moe_topk=6, moe_intermediate_size=1408),
        routed_scaling_factor=2.446,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
}

FAMILY = llama_layout_family(
    DeepseekV3Config,
    "deepseek_v3",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
    carries_extra_layers=True,  # its multi-token prediction layers (`num_nextn_predict_layers`), untrained
)
