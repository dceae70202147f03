"""Qwen 1.0 (`QWenLMHeadModel`, remote code, model_type "qwen").

The same math as Llama with MHA and a bias on the fused q|k|v projection (`c_attn`, present although the config
says `no_bias`, which refers to the other linear layers). Two naming traps: the config's `intermediate_size` is twice
the MLP width, and the MLP computes `c_proj(w1(x) * silu(w2(x)))`, so `w2` is the gate and `w1` the up projection.
`use_dynamic_ntk` / `use_logn_attn` only extend the context at inference; training's forward does not use them.
"""

from __future__ import annotations

from mdpo.config import ModelConfig
from mdpo.models.families.base import Family

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


def read_config(hf: dict) -> dict:
    if hf.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=true")
    if not hf.get("no_bias", True):
        raise ValueError("no_bias=false (biases on every linear layer)")
    if hf.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"rotary_pct={hf['rotary_pct']} (partial rotary embeddings)")
    hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    if hidden and heads and hf.get("kv_channels", hidden // heads) * heads != hidden:
        raise ValueError(f"kv_channels={hf['kv_channels']} (hidden_size/num_attention_heads != kv_channels)")
    if hf.get("intermediate_size", 0) % 2:
        raise ValueError(f"odd intermediate_size={hf['intermediate_size']} (Qwen's is twice the MLP width)")
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
        "architectures": ["QWenLMHeadModel"],
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


FAMILY = Family(
    name="qwen",
    architecture="QWenLMHeadModel",
    model_type="qwen",
    global_tensors=GLOBAL_TENSORS,
    layer_tensors=LAYER_TENSORS,
    hf_layer_prefix="transformer.h.{i}.",
    read_config=read_config,
    write_config=write_config,
    ignored_suffixes=("rotary_emb.inv_freq",),
)
