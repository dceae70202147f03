"""What the planner counts of a model: parameters and FLOPs of a `ModelConfig` (a Llama-like decoder: SwiGLU,
RMSNorm, GQA, a head size of its own, q/k biases or norms, tied or untied embeddings: every supported family; with
mixture-of-experts layers, a router and SwiGLU experts in place of the dense MLP), and the presets it knows by name.
A model is the run's own `ModelConfig`, so a config file, a HF folder and a preset describe it the same way.
"""

from __future__ import annotations

from pathlib import Path

from mdpo.checkpoint.description import describe_model
from mdpo.config import ModelConfig
from mdpo.errors import ConfigError


def _preset(
    family: str, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, **fields: object
) -> ModelConfig:
    """A preset row: the counts the planner uses, in config.json's order; `ffn` is one SwiGLU branch (Qwen's
    config.json lists twice this)."""
    return ModelConfig(
        family=family,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        **fields,
    )


# Qwen3-MoE's config.json past the counts: 128 experts, 8 per token, renormalised, load-balancing loss 0.001
QWEN3_MOE = dict(
    head_dim=128, qk_norm=True, num_experts=128, moe_topk=8, norm_topk_prob=True, router_aux_loss_coef=0.001
)

# Published configs (config.json of each model on the HF hub): the fields that change the counts or the layout
# rules; the rest (norm epsilon, RoPE base and scaling, context length) stay ModelConfig's defaults.
MODELS: dict[str, ModelConfig] = {
    "llama2-7b": _preset("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": _preset("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": _preset("llama", 8192, 28672, 80, 64, 8, 32000),
    "codellama-34b": _preset("llama", 8192, 22016, 48, 64, 8, 32000),
    "tulu2-13b": _preset("llama", 5120, 13824, 40, 40, 40, 32000),
    "tulu2-70b": _preset("llama", 8192, 28672, 80, 64, 8, 32000),
    "llama3.2-1b": _preset("llama", 2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    "llama3.2-3b": _preset("llama", 3072, 8192, 28, 24, 8, 128256, tie_word_embeddings=True),
    "llama3.1-8b": _preset("llama", 4096, 14336, 32, 32, 8, 128256),
    "llama3.1-70b": _preset("llama", 8192, 28672, 80, 64, 8, 128256),
    "tulu3-8b": _preset("llama", 4096, 14336, 32, 32, 8, 128256),
    "tulu3-70b": _preset("llama", 8192, 28672, 80, 64, 8, 128256),
    "qwen-7b": _preset("qwen", 4096, 11008, 32, 32, 32, 151936, qkv_bias=True),
    "qwen-14b": _preset("qwen", 5120, 13696, 40, 40, 40, 152064, qkv_bias=True),
    "qwen-72b": _preset("qwen", 8192, 24576, 80, 64, 64, 152064, qkv_bias=True),
    "qwen2.5-7b": _preset("qwen2", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
    "qwen2.5-14b": _preset("qwen2", 5120, 13824, 48, 40, 8, 152064, qkv_bias=True),
    "qwen2.5-32b": _preset("qwen2", 5120, 27648, 64, 40, 8, 152064, qkv_bias=True),
    "qwen2.5-72b": _preset("qwen2", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True),
    "qwen3-0.6b": _preset("qwen3", 1024, 3072, 28, 16, 8, 151936, head_dim=128, qk_norm=True, tie_word_embeddings=True),
    "qwen3-8b": _preset("qwen3", 4096, 12288, 36, 32, 8, 151936, qk_norm=True),
    "qwen3-14b": _preset("qwen3", 5120, 17408, 40, 40, 8, 151936, qk_norm=True),
    "qwen3-32b": _preset("qwen3", 5120, 25600, 64, 64, 8, 151936, head_dim=128, qk_norm=True),
    "mistral-nemo-12b": _preset("mistral", 5120, 14336, 40, 32, 8, 131072, head_dim=128),
    "baichuan2-7b": _preset("baichuan", 4096, 11008, 32, 32, 32, 125696, norm_head=True, position_embedding="rope"),
    "baichuan2-13b": _preset("baichuan", 5120, 13696, 40, 40, 40, 125696, norm_head=True, position_embedding="alibi"),
    "tinyllama-1.1b": _preset("llama", 2048, 5632, 22, 32, 4, 32000),
    # mixtures of experts: every layer's MLP is `num_experts` SwiGLU experts of moe_intermediate_size (Mixtral: of
    # intermediate_size), `moe_topk` of them per token; router_aux_loss_coef as config.json declares it
    "qwen3-30b-a3b": _preset("qwen3_moe", 2048, 6144, 48, 32, 4, 151936, **QWEN3_MOE, moe_intermediate_size=768),
    "qwen3-235b-a22b": _preset("qwen3_moe", 4096, 12288, 94, 64, 4, 151936, **QWEN3_MOE, moe_intermediate_size=1536),
    "mixtral-8x7b": _preset(
        "mixtral", 4096, 14336, 32, 32, 8, 32000, num_experts=8, moe_topk=2, router_aux_loss_coef=0.02
    ),
}


def kv_dim(model: ModelConfig) -> int:
    """Width of the key (or value) projection: the key/value heads times the head size."""
    return model.kv_channels * model.kv_heads


def q_dim(model: ModelConfig) -> int:
    """Width of the query projection and of the attention output: the heads times the head size (the hidden size
    unless the head size is set apart from it, as Qwen 3 32B's and Mistral Nemo's)."""
    return model.kv_channels * model.num_attention_heads


def attention_params(model: ModelConfig) -> int:
    """One decoder layer less its MLP: fused QKV (with Qwen's bias), the output projection, two RMSNorm weights and
    Qwen 3's per-head q/k norm weights."""
    h, q, kv = model.hidden_size, q_dim(model), kv_dim(model)
    attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if model.qkv_bias else 0)
    qk_norms = 2 * model.kv_channels if model.qk_norm else 0
    return attention + 2 * h + qk_norms


def mlp_params(model: ModelConfig, width: int) -> int:
    """One SwiGLU MLP of `width`: fused gate/up [2 width, hidden] and down [hidden, width] (a dense MLP or one
    expert)."""
    return 3 * model.hidden_size * width


def layer_params(model: ModelConfig, moe: bool = False) -> int:
    """One decoder layer: attention and norms, and the dense MLP or (`moe`) the router [experts, hidden] and every
    expert."""
    if moe:
        return attention_params(model) + model.num_experts * (model.hidden_size + mlp_params(model, model.expert_width))
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
    """The experts' weights, all layers' (0 for a dense model): what EP x ETP split and the expert data-parallel
    group reduces, apart from the dense weights."""
    return len(model.expert_layers()) * (model.num_experts or 0) * mlp_params(model, model.expert_width)


def active_params(model: ModelConfig) -> int:
    """The weights one token uses: all but the experts it is not routed to (each MoE layer runs `moe_topk` of its
    experts; the router runs whole). A dense model's every weight."""
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
    attention = 6 * model.num_hidden_layers * q_dim(model) * seq_len  # half of 12 L (heads x head size) s: causal
    n = matmul_params(model)
    if not trained:
        return 2 * n + attention / 3
    return (4 if frozen else 6) * n + attention


def lora_params(model: ModelConfig, rank: int, tp: int = 1, mlp: bool = True) -> float:
    """Adapter parameters of one decoder layer on one TP rank (all four targets; without `mlp`, an MoE layer's,
    attention's two: experts take no adapters): column-parallel q/k/v and gate/up hold A whole and 1/TP of B,
    row-parallel output and down projections 1/TP of A and B whole (`models.lora`)."""
    h, f, q = model.hidden_size, model.intermediate_size, q_dim(model)
    qkv, fc1 = q + 2 * kv_dim(model), 2 * f
    mlps = (h + fc1 / tp) + (f / tp + h) if mlp else 0.0
    return rank * ((h + qkv / tp) + (q / tp + h) + mlps)


def model_shape(name_or_path: str) -> ModelConfig:
    """A preset name, or a HF model folder / config.json of a supported family (what `mdpo plan --model` takes)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"--model {name_or_path!r}: neither a preset ({', '.join(MODELS)}) nor a HF folder")
    return describe_model({"hf_config": str(path.parent if path.name == "config.json" else path)})
