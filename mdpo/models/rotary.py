"""RoPE: its frequencies for a scaled RoPE (`rope_frequencies`), and in one kernel each way on Megatron-Core's local
layers (`model.fused_rope`).

A scaled RoPE (`model.rope_scaling`: llama3, linear, yarn) takes its inverse frequencies and its attention factor
(yarn's scale of cos and sin) from transformers' own initialisation (`ROPE_INIT_FUNCTIONS`) of the config.json
parameters the model holds, so they are exactly the HF model's: Megatron's rotary table is built from these inverse
frequencies, and the attention factor m, which scales q and k after rotation, is m^2 on every score (the softmax
scale: `models.gpt`).

Megatron's rotation (`rope_utils._apply_rotary_pos_emb_bshd`) is a chain of elementwise ops over q and over k: the
cos and sin of the table and their casts, two products, rotate_half's negation and concatenation, the sum and a
final concatenation, each a kernel reading and writing a q- or k-sized tensor, forward and backward. Transformer
Engine replaces it with its fused kernel (Megatron's `apply_rope_fusion`); without TE, `rotate_qk` is that same
function of Megatron's, q and k together, under torch.compile: one generated kernel forward and one backward
(Triton on a GPU, C++ loops on CPU), and nothing q-sized kept for backward, as before.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer.attention import SelfAttention
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mdpo.config import ModelConfig


def rope_frequencies(model: ModelConfig) -> tuple[torch.Tensor, float] | None:
    """A scaled RoPE's (inverse frequencies [head_dim / 2], attention factor) by transformers' own initialisation;
    None without a scaling (Megatron's default frequencies are the same)."""
    if model.rope_scaling is None:
        return None
    config = LlamaConfig(
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        head_dim=model.kv_channels,
        max_position_embeddings=model.max_position_embeddings,
        rope_parameters={"rope_type": model.rope_scaling, "rope_theta": model.rope_theta, **model.rope_parameters()},
    )
    with torch.device("cpu"):  # also where the model is built on the meta device (the converters)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[model.rope_scaling](config, "cpu")
    return inv_freq.float(), float(attention_factor)


@torch.compile(dynamic=True)  # every micro-batch has its own length: one compiled graph for all of them
def rotate_qk(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [s, b, heads, d], key [s, b, groups, d], freqs [s, b or 1, 1, d] (Megatron's rotary table, per row
    position or per token) -> both rotated, exactly as Megatron's unfused rotation does it."""
    return _apply_rotary_pos_emb_bshd(query, freqs), _apply_rotary_pos_emb_bshd(key, freqs)


class FusedRopeSelfAttention(SelfAttention):
    """Megatron's SelfAttention with RoPE applied by `rotate_qk` to q and k as the QKV projection hands them out.
    The rotary table reaches `get_query_key_value_tensors` through the instance for the length of one forward call
    only (Megatron then sees no table and skips its own rotation); a recomputed layer (full recompute) calls forward
    again with its own table. THD packs come with a per-token table (`PositionedGPTModel`), so the rotation needs no
    sequence boundaries: q is [t, 1, heads, d] until Megatron squeezes it."""

    _freqs: torch.Tensor | None = None  # GPTModel hands self-attention one table, for queries and keys alike

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        self._freqs = rotary_pos_emb
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._freqs = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value = super().get_query_key_value_tensors(*args, **kwargs)
        if self._freqs is not None:
            query, key = rotate_qk(query, key, self._freqs)
        return query, key, value
