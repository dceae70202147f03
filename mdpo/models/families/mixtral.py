"""Mixtral (`MixtralForCausalLM`: 8x7B, 8x22B): Mistral's attention, and in every layer a mixture of experts: a
router `block_sparse_moe.gate` and experts `block_sparse_moe.experts.E.{w1,w3,w2}` (w1 = gate, w3 = up, w2 = down;
width `intermediate_size`), top `num_experts_per_tok` of a softmax over all experts, renormalised. Its
`router_jitter_noise` (training-time noise on the router input) is refused unless 0."""

from __future__ import annotations

from transformers import MixtralConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import Refusal, preset
from mdpo.models.families.llama import LAYER_TENSORS, llama_layout_family
from mdpo.models.families.llama import REFUSALS as LLAMA_REFUSALS
from mdpo.models.families.mistral import read_config as read_mistral
from mdpo.models.families.qwen3_moe import EXPERT

MOE_TENSORS = (
    ("mlp.router.weight", ("block_sparse_moe.gate.weight",), "copy"),
    (
        EXPERT + "linear_fc1.weight",
        ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
        "gate_up",
    ),
    (EXPERT + "linear_fc2.weight", ("block_sparse_moe.experts.{e}.w2.weight",), "copy"),
)


REFUSALS = (Refusal("router_jitter_noise", bool), *LLAMA_REFUSALS)  # and Mistral's (Llama's)


def read_config(hf: dict) -> dict:
    return read_mistral(hf) | {
        "num_experts": hf.get("num_local_experts", 8),
        "moe_topk": hf.get("num_experts_per_tok", 2),
        "norm_topk_prob": True,
        "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
    }


def write_extra(model: ModelConfig) -> dict:
    return {
        "sliding_window": model.sliding_window,
        "num_local_experts": model.num_experts,
        "num_experts_per_tok": model.moe_topk,
        "router_aux_loss_coef": model.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
    }


# every layer's MLP is `num_experts` SwiGLU experts of intermediate_size, 2 per token
PRESETS = {
    "mixtral-8x7b": preset(4096, 14336, 32, 32, 8, 32000, num_experts=8, moe_topk=2, router_aux_loss_coef=0.02),
}

FAMILY = llama_layout_family(
    MixtralConfig,
    "mixtral",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # as Mistral's
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
)
