"""Baichuan 2 (`BaichuanForCausalLM`, remote code, model_type "baichuan").

Llama-like with MHA and q|k|v stacked in `W_pack`. Two differences matter:

- NormHead: Baichuan's head L2-normalises its weight rows in every forward. On import the normalisation is folded
  into the stored head (so the converted head is unit-norm per row), and mdpo's model keeps the run-time
  normalisation too (`model.norm_head`), so training has Baichuan's exact forward and gradient and the exported head
  means the same thing to Baichuan's code. The one visible effect: HF -> Megatron -> HF returns the head normalised.
- Position: 7B uses RoPE, 13B ALiBi, and config.json does not say which; like vLLM we take RoPE when hidden_size is
  4096 and ALiBi otherwise, unless `model.position_embedding` (or `mdpo convert --position-embedding`) says.
"""

from __future__ import annotations

from mdpo.config import ModelConfig
from mdpo.models.families.base import Family, Refusal, preset
from mdpo.models.families.oracles import baichuan_stand_in

GLOBAL_TENSORS = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "norm_vocab"),
)
LAYER_TENSORS = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    ("self_attention.linear_qkv.weight", ("self_attn.W_pack.weight",), "packed_qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
ROPE_HIDDEN_SIZE = 4096  # Baichuan 2 7B; every other published size (13B) uses ALiBi


ARCHITECTURES = ("BaichuanForCausalLM",)
REFUSALS = (Refusal("tie_word_embeddings", bool), Refusal("hidden_act", lambda act: act != "silu"))


def read_config(hf: dict) -> dict:
    fields = {
        name: hf.get(name)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    }
    fields["rms_norm_eps"] = hf.get("rms_norm_eps")
    fields["max_position_embeddings"] = hf.get("max_position_embeddings", hf.get("model_max_length"))
    fields["norm_head"] = True
    fields["position_embedding"] = "rope" if hf.get("hidden_size") == ROPE_HIDDEN_SIZE else "alibi"
    return {k: v for k, v in fields.items() if v is not None}


def write_config(model: ModelConfig) -> dict:
    """The config.json keys of Baichuan 2's published configs (without `auto_map`: the model code is not ours)."""
    return {
        "architectures": list(ARCHITECTURES),
        "model_type": "baichuan",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "hidden_act": "silu",
        "rms_norm_eps": model.rms_norm_eps,
        "model_max_length": model.max_position_embeddings,
        "tie_word_embeddings": False,
    }


PRESETS = {
    "baichuan2-7b": preset(4096, 11008, 32, 32, 32, 125696, norm_head=True, position_embedding="rope"),
    "baichuan2-13b": preset(5120, 13696, 40, 40, 40, 125696, norm_head=True, position_embedding="alibi"),
}

FAMILY = Family(
    name="baichuan",
    architectures=ARCHITECTURES,
    model_type="baichuan",
    global_tensors=GLOBAL_TENSORS,
    layer_tensors=LAYER_TENSORS,
    hf_layer_prefix="model.layers.{i}.",
    read_fields=read_config,
    write_config=write_config,
    oracle=baichuan_stand_in,  # transformers has no Baichuan class
    default_template="tulu2",  # Baichuan's own format is its tokenizer's chat template, where it has one
    refusals=REFUSALS,
    presets=PRESETS,
    ignored_suffixes=("rotary_emb.inv_freq", "alibi_mask", "future_mask"),
)
