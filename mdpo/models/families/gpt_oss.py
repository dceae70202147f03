"""gpt-oss (`GptOssForCausalLM`: gpt-oss-20b, gpt-oss-120b): Llama's attention (GQA, explicit head size) with biases
on q, k, v and the output projection, a learnt sink logit per head (`self_attn.sinks`: Megatron's learnable softmax
offset), sliding-window layers (window 128) alternating with full ones (`layer_types`), yarn RoPE on every layer, and
in every layer a mixture of experts: a router with a bias (`mlp.router`), top k then a softmax over the k logits, and
experts with biases whose GLU is clamped (gate at most `swiglu_limit`, the linear half within +-`swiglu_limit`) and
offset ((up + 1) gate sigmoid(1.702 gate): Megatron's quick_gelu GLU with `activation_func_clamp_value` and
`glu_linear_offset` 1).

The files hold every expert of a layer in one tensor: `mlp.experts.gate_up_proj` [experts, hidden, 2 x width] with
gate and up interleaved (gate in the even columns), `down_proj` [experts, width, hidden] and their biases (the
`expert` / `expert_gate_up` transforms, `families.base`). The released checkpoints hold the expert weights in MXFP4
(`*_blocks`, `*_scales`), which `checkpoint.hf` dequantizes as transformers does; exports are written in the model's
dtype (bf16 or float), not MXFP4.
"""

from __future__ import annotations

from typing import Any

from transformers import GptOssConfig

from mdpo.config import ModelConfig
from mdpo.models.families.base import EXPERT, Refusal, preset
from mdpo.models.families.llama import LAYER_TENSORS as LLAMA_LAYER_TENSORS
from mdpo.models.families.llama import llama_layout_family, read_llama_like
from mdpo.models.families.qwen2 import QKV_BIAS

LAYER_TENSORS = (
    *(row for row in LLAMA_LAYER_TENSORS if not row[0].startswith("mlp.")),  # every layer's MLP is experts
    *QKV_BIAS,
    ("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), "copy"),
    ("self_attention.core_attention.softmax_offset", ("self_attn.sinks",), "copy"),
)
MOE_TENSORS = (
    ("mlp.router.weight", ("mlp.router.weight",), "copy"),
    ("mlp.router.bias", ("mlp.router.bias",), "copy"),
    (EXPERT + "linear_fc1.weight", ("mlp.experts.gate_up_proj",), "expert_gate_up"),
    (EXPERT + "linear_fc1.bias", ("mlp.experts.gate_up_proj_bias",), "expert_gate_up"),
    (EXPERT + "linear_fc2.weight", ("mlp.experts.down_proj",), "expert"),
    (EXPERT + "linear_fc2.bias", ("mlp.experts.down_proj_bias",), "expert"),
)
QUICK_GELU_ALPHA = 1.702  # Megatron's quick_gelu: x sigmoid(1.702 x)
REFUSALS = (
    # the router's and the experts' biases are always there; Megatron's add_bias_linear also biases the attention
    Refusal("attention_bias", lambda bias: not bias, "the attention without biases beside biased experts"),
    Refusal("swiglu_alpha", lambda alpha: alpha != QUICK_GELU_ALPHA, f"Megatron's quick_gelu has {QUICK_GELU_ALPHA}"),
)
# what every gpt-oss has past the counts: biases, sinks, the clamped GLU, routing as a softmax over the top k
GPT_OSS = dict(
    qkv_bias=True,
    linear_bias=True,
    attention_sinks=True,
    hidden_act="quick_gelu",
    glu_linear_offset=1.0,
    norm_topk_prob=True,
)


def read_config(hf: dict) -> dict:
    """The fields of a gpt-oss config.json, read through transformers' GptOssConfig (its defaults: the window
    layers every other one from layer 0, yarn)."""
    config = GptOssConfig(**{key: value for key, value in hf.items() if key not in ("architectures", "model_type")})
    full = config.to_dict()
    windowed = [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
    windows = {}
    if windowed and config.sliding_window is not None:
        every = len(windowed) == config.num_hidden_layers
        windows = {"sliding_window": config.sliding_window, "sliding_window_layers": None if every else windowed}
    return {
        **read_llama_like(full),
        **windows,
        **GPT_OSS,
        "head_dim": config.head_dim,
        "glu_clamp": config.swiglu_limit,
        "num_experts": config.num_local_experts,
        "moe_topk": config.num_experts_per_tok,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


def write_extra(model: ModelConfig) -> dict[str, Any]:
    windowed = model.window_layers()
    return {
        "layer_types": [
            "sliding_attention" if i in windowed else "full_attention" for i in range(model.num_hidden_layers)
        ],
        "sliding_window": model.sliding_window,
        "num_local_experts": model.num_experts,
        "num_experts_per_tok": model.moe_topk,
        "swiglu_limit": model.glu_clamp,
        "router_aux_loss_coef": model.router_aux_loss_coef,
        "attention_bias": True,
    }


def _gpt_oss(layers: int, experts: int) -> dict[str, Any]:
    """A published gpt-oss: 2880 wide (experts too), 64 heads of 64, 8 KV heads, a window of 128 on every other
    layer from layer 0, 4 experts a token, yarn (factor 32 of 4096, beta 32 / 1, base 150000), swiglu_limit 7."""
    rope = dict(
        rope_theta=150000.0,
        rope_scaling="yarn",
        rope_scaling_factor=32.0,
        rope_original_max_position_embeddings=4096,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        rope_truncate=False,
        max_position_embeddings=131072,
    )
    window = dict(sliding_window=128, sliding_window_layers=list(range(0, layers, 2)))
    experts_fields = dict(num_experts=experts, moe_topk=4, router_aux_loss_coef=0.9, glu_clamp=7.0)
    return preset(2880, 2880, layers, 64, 8, 201088, head_dim=64, **GPT_OSS, **rope, **window, **experts_fields)


PRESETS = {"gpt-oss-20b": _gpt_oss(24, 32), "gpt-oss-120b": _gpt_oss(36, 128)}

FAMILY = llama_layout_family(
    GptOssConfig,
    "gpt_oss",
    LAYER_TENSORS,
    read_config,
    refusals=REFUSALS,
    presets=PRESETS,
    default_template="tulu2",  # gpt-oss's own (harmony) format is its tokenizer's chat template
    write_extra=write_extra,
    moe_tensors=MOE_TENSORS,
)
