"""What the planner counts of a model: parameters and FLOPs of a `ModelConfig` (a Llama-like decoder: SwiGLU,
RMSNorm, GQA, a head size of its own, q/k biases or norms, tied or untied embeddings: every supported family; with
mixture-of-experts layers, a router and SwiGLU experts in place of the dense MLP, and Qwen2-MoE's gated shared
expert beside them; DeepSeek-V3's multi-latent attention), and the presets it knows by name
(the registry's families' published configs). A model is the run's own `ModelConfig`, so a config file, a HF
folder and a preset describe it the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

from mdpo.checkpoint.description import describe_model
from mdpo.config import ModelConfig
from mdpo.errors import ConfigError
from mdpo.models import families
from mdpo.models.families.base import latent_attention_shapes

# The presets `mdpo plan --model NAME` knows: published configs, each in its family's module (`Family.presets`).
MODELS: dict[str, ModelConfig] = {
    name: ModelConfig(family=family.name, **fields)
    for family in families.FAMILIES.values()
    for name, fields in family.presets.items()
}


def kv_dim(model: ModelConfig) -> int:
    """Width of the key (or value) projection: the key/value heads times the head size."""
    return model.kv_channels * model.kv_heads


def q_dim(model: ModelConfig) -> int:
    """Width of the query projection and of the attention output: the heads times the head size (the hidden size
    unless the head size is set apart from it, as Qwen 3 32B's and Mistral Nemo's)."""
    return model.kv_channels * model.num_attention_heads


def score_dims(model: ModelConfig) -> tuple[int, int]:
    """Widths over the heads of the attention's two matmuls: the query / key (heads x head size; MLA's heads x
    (qk_nope_head_dim + qk_rope_head_dim)) and the value (MLA's heads x v_head_dim)."""
    if model.is_mla:
        return model.num_attention_heads * (model.qk_nope_head_dim + model.qk_rope_head_dim), q_dim(model)
    return q_dim(model), q_dim(model)


def attention_params(model: ModelConfig) -> int:
    """One decoder layer less its MLP: fused QKV (with Qwen's bias), the output projection (with gpt-oss's bias),
    gpt-oss's sink per head, two RMSNorm weights (before or after the sublayers; four with Gemma's on both sides) and
    the q/k norm weights (Qwen 3's per head, OLMo's over the whole projections); multi-latent attention's
    projections and latent norms (the mapping table's shapes) and the two norms."""
    if model.is_mla:
        shapes = latent_attention_shapes(model).values()
        return sum(math.prod(shape) for shape in shapes) + 2 * model.hidden_size
    h, q, kv = model.hidden_size, q_dim(model), kv_dim(model)
    attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if model.qkv_bias or model.linear_bias else 0)
    attention += (h if model.linear_bias else 0) + (model.num_attention_heads if model.attention_sinks else 0)
    qk_norms = 0
    if model.qk_norm:
        qk_norms = q + kv if model.qk_norm_span == "projection" else 2 * model.kv_channels
    return attention + (4 if model.norm_position == "both" else 2) * h + qk_norms


def mlp_params(model: ModelConfig, width: int) -> int:
    """One SwiGLU MLP of `width`: fused gate/up [2 width, hidden] and down [hidden, width] (a dense MLP or one
    expert), and their biases [2 width] and [hidden] (gpt-oss's)."""
    biases = 2 * width + model.hidden_size if model.linear_bias else 0
    return 3 * model.hidden_size * width + biases


def moe_gate_params(model: ModelConfig) -> int:
    """What a MoE layer holds whole on every TP rank (Megatron replicates them): the router [experts, hidden] (and
    its bias: gpt-oss's) and a shared expert's sigmoid gate [1, hidden] (DeepSeek-V3's has none; its router's score
    bias is no parameter)."""
    experts = model.num_experts or 0
    router_bias = experts if model.linear_bias else 0
    gate = model.shared_expert_intermediate_size is not None and model.shared_expert_gate
    return (experts + gate) * model.hidden_size + router_bias


def shared_expert_params(model: ModelConfig) -> int:
    """A MoE layer's shared expert MLP (Qwen2-MoE's: every token runs it; split over TP as a dense MLP); 0 without
    one."""
    width = model.shared_expert_intermediate_size
    return 0 if width is None else mlp_params(model, width)


def layer_params(model: ModelConfig, moe: bool = False) -> int:
    """One decoder layer: attention and norms, and the dense MLP or (`moe`) the router, every expert and a shared
    expert with its gate."""
    if moe:
        experts = model.num_experts * mlp_params(model, model.expert_width)
        return attention_params(model) + moe_gate_params(model) + experts + shared_expert_params(model)
    return attention_params(model) + mlp_params(model, model.intermediate_size)


def vocab_matrices(model: ModelConfig) -> int:
    """The [vocab, hidden] weights a whole model holds: input embedding and output head, or one when tied."""
    return 1 if model.tie_word_embeddings else 2


def params(model: ModelConfig) -> int:
    """Every weight: layers (dense and MoE), input embedding, output head (unless tied to the embedding) and final
    norm."""
    h, moe = model.hidden_size, set(model.expert_layers())
    layers = sum(layer_params(model, i in moe) for i in range(model.num_hidden_layers))
    return layers + vocab_matrices(model) * model.vocab_size * h + h


def expert_params(model: ModelConfig) -> int:
    """The routed experts' weights, all layers' (0 for a dense model): what EP x ETP split and the expert
    data-parallel group reduces, apart from the dense weights (a shared expert among them)."""
    return len(model.expert_layers()) * (model.num_experts or 0) * mlp_params(model, model.expert_width)


def active_params(model: ModelConfig) -> int:
    """The weights one token uses: all but the experts it is not routed to (each MoE layer runs `moe_topk` of its
    experts; the router and a shared expert run whole). A dense model's every weight."""
    idle = (model.num_experts or 0) - (model.moe_topk if model.is_moe else 0)
    return params(model) - len(model.expert_layers()) * idle * mlp_params(model, model.expert_width)


def matmul_params(model: ModelConfig) -> int:
    """N of the 6N rule: the active weights that do matrix work per token (the head counts, the input embedding
    not; a tied matrix does the head's work)."""
    return active_params(model) - (vocab_matrices(model) - 1) * model.vocab_size * model.hidden_size


def flops_per_token(model: ModelConfig, seq_len: float, trained: bool, frozen: bool = False) -> float:
    """Forward + backward (trained) or forward only (a reference pass), causal attention over seq_len: the FLOPs
    the planner's step time and bench_dpo.py's MFU both count, over the active weights (an MoE token's experts and
    the router). `frozen` (LoRA): the backward computes the activations' gradients but no weight gradients of the
    base, 4N instead of 6N (the adapters' are negligible)."""
    # half of 6 L (query / key width + value width) s, both matmuls' forward and backward: causal
    attention = 3 * model.num_hidden_layers * sum(score_dims(model)) * seq_len
    n = matmul_params(model)
    if not trained:
        return 2 * n + attention / 3
    return (4 if frozen else 6) * n + attention


def lora_params(model: ModelConfig, rank: int, tp: int = 1, mlp: bool = True) -> float:
    """Adapter parameters of one decoder layer on one TP rank (all four targets; without `mlp`, an MoE layer's,
    attention's two: experts take no adapters): column-parallel q/k/v and gate/up hold A whole and 1/TP of B,
    row-parallel output and down projections 1/TP of A and B whole (`models.lora`); MLA's qkv: `latent_lora_width`."""
    h, f, q = model.hidden_size, model.intermediate_size, q_dim(model)
    qkv = latent_lora_width(model, tp) if model.is_mla else h + (q + 2 * kv_dim(model)) / tp
    mlps = (h + 2 * f / tp) + (f / tp + h) if mlp else 0.0
    return rank * (qkv + (q / tp + h) + mlps)


def latent_lora_width(model: ModelConfig, tp: int) -> float:
    """A and B's elements per unit of rank of qkv's adapters on multi-latent attention, on one TP rank: the up
    projections' (or the plain query projection's) A whole and 1/TP of B, the down projections' A and B whole."""
    qk, _ = score_dims(model)
    h, latent = model.hidden_size, model.kv_lora_rank
    kv = latent + model.num_attention_heads * (model.qk_nope_head_dim + model.v_head_dim) / tp
    down = h + latent + model.qk_rope_head_dim + (h + model.q_lora_rank if model.q_lora_rank else 0)
    return (model.q_lora_rank or h) + qk / tp + kv + down


def model_shape(name_or_path: str) -> ModelConfig:
    """A preset name, or a HF model folder / config.json of a supported family (what `mdpo plan --model` takes)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"--model {name_or_path!r}: neither a preset ({', '.join(MODELS)}) nor a HF folder")
    return describe_model({"hf_config": str(path.parent if path.name == "config.json" else path)})
