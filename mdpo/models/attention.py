"""Core attention through torch's scaled_dot_product_attention, for Megatron-Core's local layer spec.

Megatron's local `DotProductAttention` materialises the [b, heads, s, s] score matrix in the activation dtype;
SDPA dispatches to flash / memory-efficient kernels on GPU (and a fused CPU kernel), which is what a GPU without
Transformer Engine needs. Same interface and math: grouped query heads, Megatron's bool mask (True = masked).
Packed rows come as THD sequences (Megatron's PackedSeqParams): on a GPU torch's flash `varlen_attn` takes the
boundaries directly; elsewhere the block-diagonal causal mask is built from them. Context parallelism (which
Megatron's own DotProductAttention refuses) gathers K and V over the CP group, as Llama 3's training did.
`ALiBiAttention` adds ALiBi's per-head linear biases to the scores (Baichuan 2 13B), as an additive SDPA mask.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch.nn.attention.bias import causal_lower_right


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


def _varlen_attn():
    """torch's flash varlen attention (torch >= 2.9, CUDA), or None where it is missing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def causal_varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal attention of each packed sequence to itself: q, k, v [t, heads, d] (k, v already repeated to the query
    heads) -> [t, heads, d]. Flash varlen on CUDA in half precision; a block-diagonal mask through SDPA otherwise.
    torch's varlen signature changed after 2.9 (is_causal -> window_size, scale added): both are handled."""
    varlen = _varlen_attn()
    if varlen is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        params = inspect.signature(varlen).parameters
        kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel scales by 1/sqrt(d): fold the difference into q
            q = q * (scale * math.sqrt(q.shape[-1]))
        return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    t = q.shape[0]
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(t, device=q.device), right=True)
    allowed = (segment[None, :] == segment[:, None]) & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)


class SDPAttention(DotProductAttention):
    """Drop-in for DotProductAttention (its constructor sets heads per partition and the softmax scale)."""

    def __init__(self, config, *args, **kwargs) -> None:
        local = copy.copy(config)
        local.context_parallel_size = 1  # the parent asserts CP == 1; context parallelism is done here
        super().__init__(local, *args, **kwargs)
        self.config = config

    def score_bias(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        """An additive [heads, sq, sk] bias on the attention scores; none for plain attention."""
        return None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        """query [sq, b, heads, d], key/value [sk, b, groups, d] -> context [sq, b, heads * d]; packed (THD):
        query [t, heads, d], key/value [t, groups, d] -> [t, heads, d]."""
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention takes no attention bias")
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if packed_seq_params is not None:
            if self.score_bias(1, 1, query.device) is not None:
                raise NotImplementedError(f"{type(self).__name__} takes packed rows as a block mask, not THD")
            if repeat > 1:
                key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
            p = packed_seq_params
            return causal_varlen_attention(query, key, value, p.cu_seqlens_q, p.max_seqlen_q, self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        if self.config.context_parallel_size > 1:
            if attention_mask is not None or self.score_bias(1, 1, query.device) is not None:
                raise NotImplementedError("context parallelism takes plain causal attention (no mask, no bias)")
            key, value = (self._gather_sequence(t) for t in (key, value))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.config.context_parallel_size > 1:
            context = self._context_parallel_attention(q, k, v)
            return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
        sk = key.shape[0]
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

    @staticmethod
    def _gather_sequence(x: torch.Tensor) -> torch.Tensor:
        """[s/cp, b, g, d] holding sequence chunks (rank, 2cp-1-rank) -> the whole [s, b, g, d] in order; backward
        reduce-scatters the gradient to the ranks that own each chunk."""
        group = parallel_state.get_context_parallel_group()
        cp, half = group.size(), x.shape[0] // 2
        parts = gather_from_sequence_parallel_region(x, True, group).view(cp, 2, half, *x.shape[1:])
        # chunk c < cp is rank c's first half; chunk cp + i is rank cp - 1 - i's second half
        return torch.cat([parts[c, 0] for c in range(cp)] + [parts[cp - 1 - i, 1] for i in range(cp)])

    def _context_parallel_attention(self, q, k, v) -> torch.Tensor:
        """q [b, n, s/cp, d] (this rank's two chunks), k/v [b, n, s, d] -> [b, n, s/cp, d]: each query chunk attends
        causally to the keys up to its own end (SDPA's lower-right causal mask)."""
        group = parallel_state.get_context_parallel_group()
        cp, rank, half = group.size(), group.rank(), q.shape[2] // 2
        out = []
        for part, chunk in enumerate((rank, 2 * cp - 1 - rank)):
            end = (chunk + 1) * half
            out.append(
                F.scaled_dot_product_attention(
                    q[:, :, part * half : (part + 1) * half],
                    k[:, :, :end],
                    v[:, :, :end],
                    attn_mask=causal_lower_right(half, end),
                    dropout_p=self.attention_dropout.p if self.training else 0.0,
                    scale=self.softmax_scale,
                )
            )
        return torch.cat(out, dim=2)


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
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
