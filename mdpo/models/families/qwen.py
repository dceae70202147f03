"""Qwen 1.0 (`QWenLMHeadModel`, remote code, model_type "qwen").

The same math as Llama with MHA and a bias on the fused q|k|v projection (`c_attn`, present although the config
says `no_bias`, which refers to the other linear layers). Two naming traps: the config's `intermediate_size` is twice
the MLP width, and the MLP computes `c_proj(w1(x) * silu(w2(x)))`, so `w2` is the gate and `w1` the up projection.
`use_dynamic_ntk` / `use_logn_attn` only extend the context at inference; training's forward does not use them.
"""

from __future__ import annotations

from mdpo.config import ModelConfig
from mdpo.models.families.base import Family, Refusal, preset
from mdpo.models.families.oracles import qwen_stand_in

GLOBAL_TENSORS = (
    ("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
    ("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "vocab"),
)
LAYER_TENSORS = (
    ("input_layernorm.weight", ("ln_1.weight",), "copy"),
    ("self_attention.linear_qkv.weight", ("attn.c_attn.weight",), "packed_qkv"),
    ("self_attention.linear_qkv.bias", ("attn.c_attn.bias",), "packed_qkv"),
    ("self_attention.linear_proj.weight", ("attn.c_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("ln_2.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.w2.weight", "mlp.w1.weight"), "gate_up"),  # [gate; up] = [w2; w1]
    ("mlp.linear_fc2.weight", ("mlp.c_proj.weight",), "copy"),
)


ARCHITECTURES = ("QWenLMHeadModel",)
REFUSALS = (
    Refusal("tie_word_embeddings", bool),
    Refusal("no_bias", lambda no_bias: not no_bias, "biases on every linear layer"),
    Refusal("rotary_pct", lambda pct: pct != 1.0, "partial rotary embeddings"),
    Refusal("intermediate_size", lambda size: size % 2 == 1, "odd: Qwen's is twice the MLP width"),
)


def read_config(hf: dict) -> dict:
    hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    if hidden and heads and hf.get("kv_channels", hidden // heads) * heads != hidden:
        raise ValueError(f"kv_channels={hf['kv_channels']} (hidden_size/num_attention_heads != kv_channels)")
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": hf["intermediate_size"] // 2 if "intermediate_size" in hf else None,
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "rms_norm_eps": hf.get("layer_norm_epsilon"),
        "rope_theta": hf.get("rotary_emb_base"),
        "max_position_embeddings": hf.get("max_position_embeddings", hf.get("seq_length")),
        "qkv_bias": True,
    }
    return {k: v for k, v in fields.items() if v is not None}


def write_config(model: ModelConfig) -> dict:
    """The config.json keys of Qwen-7B's published config (without `auto_map`: the model code is not ours)."""
    return {
        "architectures": list(ARCHITECTURES),
        "model_type": "qwen",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": 2 * model.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "kv_channels": model.hidden_size // model.num_attention_heads,
        "layer_norm_epsilon": model.rms_norm_eps,
        "rotary_emb_base": model.rope_theta,
        "rotary_pct": 1.0,
        "max_position_embeddings": model.max_position_embeddings,
        "seq_length": model.max_position_embeddings,
        "no_bias": True,
        "tie_word_embeddings": False,
    }


PRESETS = {
    "qwen-7b": preset(4096, 11008, 32, 32, 32, 151936, qkv_bias=True),
    "qwen-14b": preset(5120, 13696, 40, 40, 40, 152064, qkv_bias=True),
    "qwen-72b": preset(8192, 24576, 80, 64, 64, 152064, qkv_bias=True),
}

FAMILY = Family(
    name="qwen",
    architectures=ARCHITECTURES,
    model_type="qwen",
    global_tensors=GLOBAL_TENSORS,
    layer_tensors=LAYER_TENSORS,
    hf_layer_prefix="transformer.h.{i}.",
    read_fields=read_config,
    write_config=write_config,
    oracle=qwen_stand_in,  # transformers has no Qwen 1.0 class
    default_template="tulu2",  # Qwen's own format (ChatML) is its tokenizer's chat template
    refusals=REFUSALS,
    presets=PRESETS,
    ignored_suffixes=("rotary_emb.inv_freq",),
)
