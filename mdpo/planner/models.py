"""What the planner counts of a model: parameters and FLOPs of a `ModelConfig` (a Llama-like decoder: untied
embeddings, SwiGLU, RMSNorm, GQA; Llama 2, Qwen 1.0 and Baichuan 2 are all this shape), and the presets it knows by
name. A model is the run's own `ModelConfig`, so a config file, a HF folder and a preset describe it the same way.
"""

from __future__ import annotations

from pathlib import Path

from mdpo.checkpoint.description import describe_model
from mdpo.config import ModelConfig
from mdpo.errors import ConfigError


def _preset(family: str, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
            **fields: object) -> ModelConfig:  # fmt: skip
    """A preset row: the counts the planner uses, in config.json's order; `ffn` is one SwiGLU branch (Qwen's
    config.json lists twice this)."""
    return ModelConfig(family=family, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       **fields)  # fmt: skip


# Published configs (config.json of each model on the HF hub): the fields that change the counts or the layout
# rules; the rest (norm epsilon, RoPE base, context length) stay ModelConfig's defaults.
MODELS: dict[str, ModelConfig] = {
    "llama2-7b": _preset("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": _preset("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": _preset("llama", 8192, 28672, 80, 64, 8, 32000),
    "codellama-34b": _preset("llama", 8192, 22016, 48, 64, 8, 32000),
    "tulu2-13b": _preset("llama", 5120, 13824, 40, 40, 40, 32000),
    "tulu2-70b": _preset("llama", 8192, 28672, 80, 64, 8, 32000),
    "qwen-7b": _preset("qwen", 4096, 11008, 32, 32, 32, 151936, qkv_bias=True),
    "qwen-14b": _preset("qwen", 5120, 13696, 40, 40, 40, 152064, qkv_bias=True),
    "qwen-72b": _preset("qwen", 8192, 24576, 80, 64, 64, 152064, qkv_bias=True),
    "baichuan2-7b": _preset("baichuan", 4096, 11008, 32, 32, 32, 125696, norm_head=True, position_embedding="rope"),
    "baichuan2-13b": _preset("baichuan", 5120, 13696, 40, 40, 40, 125696, norm_head=True, position_embedding="alibi"),
    "tinyllama-1.1b": _preset("llama", 2048, 5632, 22, 32, 4, 32000),
}


def kv_dim(model: ModelConfig) -> int:
    """Width of the key (or value) projection: the key/value heads times the head size."""
    return model.hidden_size // model.num_attention_heads * model.kv_heads


def layer_params(model: ModelConfig) -> int:
    """One decoder layer: fused QKV (with Qwen's bias), the output projection, SwiGLU and two RMSNorm weights."""
    h, kv = model.hidden_size, kv_dim(model)
    attention = h * (h + 2 * kv) + h * h + ((h + 2 * kv) if model.qkv_bias else 0)
    return attention + 3 * h * model.intermediate_size + 2 * h


def params(model: ModelConfig) -> int:
    """Every weight: layers, input embedding, output head and final norm."""
    h = model.hidden_size
    return model.num_hidden_layers * layer_params(model) + 2 * model.vocab_size * h + h


def matmul_params(model: ModelConfig) -> int:
    """N of the 6N rule: the weights that do matrix work per token (the head counts, the input embedding not)."""
    return params(model) - model.vocab_size * model.hidden_size


def flops_per_token(model: ModelConfig, seq_len: float, trained: bool, frozen: bool = False) -> float:
    """Forward + backward (trained) or forward only (a reference pass), causal attention over seq_len: the FLOPs
    the planner's step time and bench_dpo.py's MFU both count. `frozen` (LoRA): the backward computes the
    activations' gradients but no weight gradients of the base, 4N instead of 6N (the adapters' are negligible)."""
    attention = 6 * model.num_hidden_layers * model.hidden_size * seq_len  # half of 12 L h s: causal
    n = matmul_params(model)
    if not trained:
        return 2 * n + attention / 3
    return (4 if frozen else 6) * n + attention


def lora_params(model: ModelConfig, rank: int, tp: int = 1) -> float:
    """Adapter parameters of one decoder layer on one TP rank (all four targets): column-parallel q/k/v and gate/up
    hold A whole and 1/TP of B, row-parallel output and down projections 1/TP of A and B whole (`models.lora`)."""
    h, f = model.hidden_size, model.intermediate_size
    qkv, fc1 = h + 2 * kv_dim(model), 2 * f
    return rank * ((h + qkv / tp) + (h / tp + h) + (h + fc1 / tp) + (f / tp + h))


def model_shape(name_or_path: str) -> ModelConfig:
    """A preset name, or a HF model folder / config.json of a supported family (what `mdpo plan --model` takes)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"--model {name_or_path!r}: neither a preset ({', '.join(MODELS)}) nor a HF folder")
    return describe_model({"hf_config": str(path.parent if path.name == "config.json" else path)})
