"""HF Llama <-> Megatron-Core GPTModel weights: one mapping table plus the two real transforms.

The table is the documentation: every Megatron tensor and the HF tensor(s) it is made of. `fused_qkv` packs
q/k/v per query group ([q heads of the group, k, v] for each KV head), Megatron's layout, so GQA shards cleanly
over TP; `gate_up` stacks [gate; up] into `linear_fc1`. Embedding and head are padded to the padded vocabulary.
Tensors here are full (unsharded); `mdpo.models.sharding` cuts them for a TP/PP rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mdpo.config import ModelConfig

LAYER_PREFIX_MCORE = "decoder.layers.{i}."
LAYER_PREFIX_HF = "model.layers.{i}."

# (megatron name, HF names, transform); names under a layer are relative to the layer prefixes above.
GLOBAL_TENSORS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "vocab"),
)
LAYER_TENSORS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    (
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "fused_qkv",
    ),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)


@dataclass(frozen=True)
class Heads:
    """Attention head geometry needed to (un)fuse QKV."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: ModelConfig) -> Heads:
        kv = model.num_key_value_heads or model.num_attention_heads
        return cls(model.num_attention_heads, kv, model.hidden_size // model.num_attention_heads)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> torch.Tensor:
    """[q; k; v] (HF) -> per query group [q_0..q_{g-1}, k, v] (Megatron)."""
    per_group = heads.num_heads // heads.num_kv_heads
    hidden = q.shape[-1]
    q = q.reshape(heads.num_kv_heads, per_group * heads.head_dim, hidden)
    k = k.reshape(heads.num_kv_heads, heads.head_dim, hidden)
    v = v.reshape(heads.num_kv_heads, heads.head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    per_group = heads.num_heads // heads.num_kv_heads
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(heads.num_kv_heads, (per_group + 2) * heads.head_dim, hidden)
    q, k, v = torch.split(grouped, [per_group * heads.head_dim, heads.head_dim, heads.head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Zero rows for the padded vocabulary; their logits are masked out of the softmax anyway."""
    if weight.shape[0] > padded_rows:
        raise ValueError(f"vocab rows {weight.shape[0]} exceed the padded vocabulary {padded_rows}")
    pad = weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


def hf_config(model: ModelConfig) -> dict:
    """config.json for `LlamaForCausalLM` with this architecture."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads or model.num_attention_heads,
        rms_norm_eps=model.rms_norm_eps,
        rope_theta=model.rope_theta,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    return config.to_dict()


def _entries(num_layers: int):
    for mcore, hf, kind in GLOBAL_TENSORS:
        yield mcore, hf, kind
    for i in range(num_layers):
        for mcore, hf, kind in LAYER_TENSORS:
            yield (
                LAYER_PREFIX_MCORE.format(i=i) + mcore,
                tuple(LAYER_PREFIX_HF.format(i=i) + name for name in hf),
                kind,
            )


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF Llama tensor must have for this architecture."""
    heads = Heads.of(model)
    h, f, v = model.hidden_size, model.intermediate_size, model.vocab_size
    kv = heads.num_kv_heads * heads.head_dim
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads.num_heads * heads.head_dim, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, heads.num_heads * heads.head_dim),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(model.num_hidden_layers):
        shapes.update({LAYER_PREFIX_HF.format(i=i) + name: shape for name, shape in layer.items()})
    return shapes


def hf_to_mcore(hf_state: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Full HF Llama state dict -> full (TP=1, PP=1) Megatron state dict; names a missing, extra or misshapen
    tensor."""
    for name, shape in hf_shapes(model).items():
        if name in hf_state and tuple(hf_state[name].shape) != shape:
            raise ValueError(
                f"tensor '{name}' has shape {tuple(hf_state[name].shape)}, the model config expects {shape}"
            )
    heads = Heads.of(model)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for mcore, hf_names, kind in _entries(model.num_hidden_layers):
        missing = [n for n in hf_names if n not in hf_state]
        if missing:
            raise KeyError(f"HF checkpoint is missing tensor '{missing[0]}' (needed for '{mcore}')")
        tensors = [hf_state[n] for n in hf_names]
        used.update(hf_names)
        if kind == "fused_qkv":
            out[mcore] = fuse_qkv(*tensors, heads)
        elif kind == "gate_up":
            out[mcore] = torch.cat(tensors, dim=0)
        elif kind == "vocab":
            out[mcore] = pad_vocab(tensors[0], padded_vocab)
        else:
            out[mcore] = tensors[0]
    extra = sorted(k for k in hf_state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise KeyError(f"HF checkpoint has unexpected tensor '{extra[0]}' (and {len(extra) - 1} more)")
    return out


def mcore_to_hf(mcore_state: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Full Megatron state dict -> HF Llama state dict, vocab padding stripped."""
    heads = Heads.of(model)
    out: dict[str, torch.Tensor] = {}
    for mcore, hf_names, kind in _entries(model.num_hidden_layers):
        tensor = mcore_state[mcore]
        if kind == "fused_qkv":
            parts = split_qkv(tensor, heads)
        elif kind == "gate_up":
            parts = torch.chunk(tensor, 2, dim=0)
        elif kind == "vocab":
            parts = (tensor[: model.vocab_size],)
        else:
            parts = (tensor,)
        out.update({name: part.contiguous() for name, part in zip(hf_names, parts)})
    return out
