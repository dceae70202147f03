"""Core attention through torch's scaled_dot_product_attention, for Megatron-Core's local layer spec.

Megatron's local `DotProductAttention` materialises the [b, heads, s, s] score matrix in the activation dtype;
SDPA dispatches to flash / memory-efficient kernels on GPU (and a fused CPU kernel), which is what a GPU without
Transformer Engine needs. Same interface and math: grouped query heads, Megatron's bool mask (True = masked).
`ALiBiAttention` adds ALiBi's per-head linear biases to the scores (Baichuan 2 13B), as an additive SDPA mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.'s ALiBi slopes (as Baichuan 2 13B and BLOOM use them): a geometric sequence for the largest
    power of two <= num_heads, then every other slope of the next power's sequence for the remaining heads."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(closest)
    if closest < num_heads:
        slopes += geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class SDPAttention(DotProductAttention):
    """Drop-in for DotProductAttention (its constructor sets heads per partition and the softmax scale)."""

    def score_bias(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        """An additive [heads, sq, sk] bias on the attention scores; none for plain attention."""
        return None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        """query [sq, b, heads, d], key/value [sk, b, groups, d] -> context [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes packed rows as a block mask and no attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        sq, b, sk = query.shape[0], query.shape[1], key.shape[0]
        bias = self.score_bias(sq, sk, query.device)
        if bias is None:
            mask, causal = (None, True) if attention_mask is None else (~attention_mask, False)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(1)
            mask, causal = bias.to(q.dtype).masked_fill(attention_mask, float("-inf")), False
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.softmax_scale,
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


class ALiBiAttention(SDPAttention):
    """SDPA with ALiBi: score(i, j) += slope_h * (j - i). Each TP rank holds the slopes of its own heads; packed
    sequences need no reset because the bias depends only on the distance within the (block-masked) sequence."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        per_rank = self.num_attention_heads_per_partition
        first = parallel_state.get_tensor_model_parallel_rank() * per_rank
        slopes = alibi_slopes(config.num_attention_heads)[first : first + per_rank]
        self.register_buffer("slopes", slopes, persistent=False)  # not a weight: kept out of checkpoints

    def score_bias(self, sq: int, sk: int, device: torch.device) -> torch.Tensor:
        distance = torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None]
        return self.slopes.to(device)[:, None, None] * distance


def with_core_attention(spec, core_attention: type[DotProductAttention]):
    """A copy of a local GPT layer spec whose self-attention uses another core attention class."""
    import copy

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
