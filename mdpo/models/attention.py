"""Core attention through torch's scaled_dot_product_attention, for Megatron-Core's local layer spec.

Megatron's local `DotProductAttention` materialises the [b, heads, s, s] score matrix in the activation dtype;
SDPA dispatches to flash / memory-efficient kernels on GPU (and a fused CPU kernel), which is what a GPU without
Transformer Engine needs. Same interface and math: grouped query heads, Megatron's bool mask (True = masked).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """Drop-in for DotProductAttention (its constructor sets heads per partition and the softmax scale)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        """query [sq, b, heads, d], key/value [sk, b, groups, d] -> context [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes packed rows as a block mask and no attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=attention_mask is None,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.softmax_scale,
        )
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def with_sdpa(spec):
    """A copy of a local GPT layer spec whose self-attention uses SDPAttention."""
    import copy

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
