"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, 235B-A22B): Qwen 3's attention (q/k norms, explicit head_dim)
with a mixture of experts in the MLP: a router `mlp.gate` [experts, hidden] and experts `mlp.experts.E.{gate,up,
down}_proj` of width `moe_intermediate_size`, top `num_experts_per_tok` of a softmax over all experts, renormalised
when `norm_topk_prob`. Layers in `mlp_only_layers`, or off the `decoder_sparse_step`, keep a dense MLP of
`intermediate_size`. The files hold one tensor per expert (transformers 5 fuses them only in memory)."""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import Refusal, preset
from mdpo.models.families.llama import llama_layout_family
from mdpo.models.families.qwen2 import write_windows
from mdpo.models.families.qwen3 import LAYER_TENSORS
from mdpo.models.families.qwen3 import REFUSALS as QWEN3_REFUSALS
from mdpo.models.families.qwen3 import read_config as read_qwen3

EXPERT = "mlp.experts.local_experts.{e}."
MOE_TENSORS = (
    ("mlp.router.weight", ("mlp.gate.weight",), "copy"),
    (EXPERT + "linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "gate_up"),
    (EXPERT + "linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), "copy"),
)


REFUSALS = (Refusal("shared_expert_intermediate_size", bool, "shared experts"), *QWEN3_REFUSALS)


def sparse_layers(hf: dict, layers: int) -> list[int] | None:
    """transformers' rule for the layers with experts; None when every layer has them."""
    dense, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step", 1) or 1
    sparse = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
    return None if len(sparse) == layers else sparse


def read_experts(hf: dict, default_topk: int = 8) -> dict:
    """The routed experts' fields of a Qwen MoE config.json (Qwen3-MoE's keys, which Qwen2-MoE shares)."""
    return {
        "num_experts": hf.get("num_experts", hf.get("num_local_experts")),
        "moe_topk": hf.get("num_experts_per_tok", default_topk),
        "moe_intermediate_size": hf.get("moe_intermediate_size"),
        "moe_layers": sparse_layers(hf, hf.get("num_hidden_layers", 0)),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
    }


def write_experts(model: ModelConfig) -> dict:
    """Inverse of `read_experts`: the dense layers listed in `mlp_only_layers`."""
    sparse = set(model.expert_layers())
    return {
        "num_experts": model.num_experts,
        "num_experts_per_tok": model.moe_topk,
        "moe_intermediate_size": model.expert_width,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(model.num_hidden_layers) if i not in sparse],
        "norm_topk_prob": model.norm_topk_prob,
        "router_aux_loss_coef": model.router_aux_loss_coef,
    }


def read_config(hf: dict) -> dict:
    return read_qwen3(hf) | read_experts(hf)


def write_extra(model: ModelConfig) -> dict:
    return write_windows(model) | write_experts(model)


# Qwen3-MoE's config.json past the counts: 128 experts, 8 per token, renormalised, load-balancing loss 0.001; every
# layer's MLP is `num_experts` SwiGLU experts of moe_intermediate_size
_EXPERTS = dict(
    head_dim=128, qk_norm=True, num_experts=128, moe_topk=8, norm_topk_prob=True, router_aux_loss_coef=0.001
)
PRESETS = {
    "qwen3-30b-a3b": preset(2048, 6144, 48, 32, 4, 151936, **_EXPERTS, moe_intermediate_size=768),
    "qwen3-235b-a22b": preset(4096, 12288, 94, 64, 4, 151936, **_EXPERTS, moe_intermediate_size=1536),
}

FAMILY = llama_layout_family(
    Qwen3MoeConfig,
    "qwen3_moe",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # as Qwen 3's
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
)
