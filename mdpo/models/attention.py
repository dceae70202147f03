"""mdpo's core attentions for Megatron-Core's local layer spec: torch SDPA, SDPA with ALiBi, and Megatron's own
unfused attention, each also taking attention within sequences (`Blocks`) without an [s, s] mask.

- Plain rows (each sequence a row): causal attention, no mask (SDPA then runs its flash / fused kernels).
- THD (packed rows on a GPU, unshared prompts): torch's flash `varlen_attn` takes the sequence boundaries.
- Blocks (packed rows elsewhere, and shared prompts everywhere): the micro-batch's tokens are gathered per block
  (its queries; its keys: the sequence's own, or a shared prompt's followed by the rejected response's), each block
  attends causally aligned at its end, and the outputs are scattered back. On a GPU in half precision one
  `varlen_attn` call covers every block; otherwise one attention call per block. Cost: the sum over sequences of
  their own attention, never the pack's or the row's square.

Context parallelism (which Megatron's own DotProductAttention refuses) gathers K and V over the CP group, as Llama 3's
training did. `ALiBiAttention` adds ALiBi's per-head linear biases on position ids (Baichuan 2 13B).

Sliding windows (Mistral, Qwen 2's `use_sliding_window`): the layers Megatron's `window_size` and
`window_attn_skip_freq` name attend to the keys less than `window` positions back (HF's `sliding_window`, Megatron's
`window_size = (window - 1, 0)`). A window counts positions, not places in the row, so a shared prompt's rejected
response reaches back into the prompt as in its own sequence; every layout (plain rows, blocks, THD, context
parallelism) applies it, with masks where the kernel takes no window.

Attention sinks (gpt-oss: Megatron's learnable `softmax_offset`, one logit per head): each query's softmax runs over
its scores and its head's sink, the sink's share dropped. Megatron's unfused softmax takes them (`LocalAttention`);
torch's SDPA and varlen kernels do not, so `SDPAttention` then computes its softmax explicitly
(`attention_with_sinks`), in every layout but THD, which mdpo then does not send (`gpt.packs_as_thd`).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.utils import is_layer_window_attention
from torch.nn.attention.bias import causal_lower_right

from mdpo.blocks import Blocks


@dataclass
class BlockAttention(PackedSeqParams):
    """How a micro-batch with `Blocks` reaches the core attention. It rides in Megatron's `packed_seq_params`, which
    every layer passes on unchanged (activation recompute included); its `sbhd` format keeps Megatron's own THD
    handling out of the way. `max_seqlen_q/kv` cover the position ids (Megatron sizes its rotary table by them)."""

    blocks: Blocks | None = None


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


def _varlen_attn() -> Callable | None:
    """torch's flash varlen attention (torch >= 2.9, CUDA), or None where it is missing."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # optional: a torch version's kernel
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel(q: torch.Tensor) -> Callable | None:
    """The varlen kernel when it can run on these tensors (CUDA, half precision), else None."""
    varlen = _varlen_attn()
    return varlen if varlen is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None


def varlen_takes_window() -> bool:
    """Whether torch's varlen kernel takes a window (its signature after 2.9)."""
    varlen = _varlen_attn()
    return varlen is not None and "window_size" in inspect.signature(varlen).parameters


def causal_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, window: int | None = None):
    """Flash varlen: sequence i's queries attend causally, aligned at the end, to its keys (within `window`
    positions when given: callers check `varlen_takes_window`). q [Tq, heads, d], k/v [Tk, heads, d] (already
    repeated to the query heads). torch's signature changed after 2.9 (is_causal -> window_size, scale added): both
    are handled."""
    varlen = _varlen_attn()
    params = inspect.signature(varlen).parameters
    left = window - 1 if window else -1
    kwargs = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel scales by 1/sqrt(d): fold the difference into q
        q = q * (scale * math.sqrt(q.shape[-1]))
    return varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def attention_with_sinks(q, k, v, sinks: torch.Tensor, scale: float, mask=None, dropout: float = 0.0):
    """q [b, heads, sq, d], k/v [b, heads, sk, d], sinks [heads] -> [b, heads, sq, d]: softmax over each query's
    scores and its head's sink logit, the sink's share dropped (transformers' gpt-oss eager attention). `mask`: SDPA's
    (bool, True = attend, or additive floats) [.., sq, sk]; None: causal, aligned at the end."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is None:
        mask = ~causal_end_mask(q.shape[-2], k.shape[-2], q.device)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(F.dropout(probs, dropout) if dropout else probs, v)


def mark_sinks(attention: DotProductAttention) -> None:
    """Attention sinks (Megatron's learnable `softmax_offset`, this rank's heads) marked as split over TP, as
    Megatron's linear layers mark their weights: its DotProductAttention leaves them unmarked, so the gradient norm
    (and the clipping by it) counted the first TP rank's only."""
    if attention.softmax_offset is not None:
        set_tensor_model_parallel_attributes(attention.softmax_offset, True, 0, 1)


def causal_end_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """Megatron's bool mask (True = masked) for sq queries attending causally to sk keys, aligned at the end."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)


def window_allowed(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int) -> torch.Tensor:
    """[sq, sk] True where a query may attend a key: causal by position and less than `window` positions back (HF's
    `sliding_window`). Positions, not places in the row: a shared prompt's rejected response sees the prompt's last
    positions as its own sequence would."""
    distance = q_positions[:, None] - k_positions[None, :]
    return (distance >= 0) & (distance < window)


def layer_window(config, layer_number: int) -> int | None:
    """The window (in positions) of layer `layer_number` (1-based, global): Megatron's `window_size` (left, 0) on
    the layers `window_attn_skip_freq` marks, else None."""
    if not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        return None
    return config.window_size[0] + 1


def without_window(config):
    """A copy of the config without windows, for Megatron's DotProductAttention under mdpo's attentions: with a
    window its softmax builds its own mask and drops the one passed (megatron-core 0.16's fused_softmax)."""
    plain = copy.copy(config)
    plain.window_size = plain.window_attn_skip_freq = None
    return plain


def row_major(x: torch.Tensor) -> torch.Tensor:
    """x with row-major strides (copied only where it has others). torch's matmul folds an [s, b, h] input into one
    mm when its strides allow it or when the weight requires grad, and runs bmm otherwise, so a frozen reference fed
    transposed activations would differ from an equal policy by rounding. `contiguous()` is not enough: it keeps any
    stride on a size-1 dimension (one-row micro-batches)."""
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.insert(0, step)
        step *= size
    return x if list(x.stride()) == strides else x.clone(memory_format=torch.contiguous_format)


def attend_blocks(query, key, value, blocks: Blocks, attend: Callable) -> torch.Tensor:
    """query [s, b, heads, d], key/value [s, b, heads or groups, d] (Megatron's layout; MLA's values have a size of
    their own) -> context [s, b, heads, value size]:
    the blocks' queries and keys are gathered (q [Q, heads, d], k/v [K, ..., d]) and `attend(q, k, v) ->
    [Q, heads, d]` attends each block's queries to its keys, causally aligned at the end (all blocks in one kernel
    call, or `per_block`). Tokens in no block get zeros."""
    s, b = query.shape[0], query.shape[1]
    flat = lambda x: x.transpose(0, 1).reshape(b * s, *x.shape[2:])  # row-major tokens, as Blocks index them
    q = flat(query).index_select(0, blocks.q_index)
    k, v = (flat(x).index_select(0, blocks.k_index) for x in (key, value))
    out = attend(q, k, v)
    # Scattered back by a gather from [out; a zero row] (padding reads the zero row): index_select keeps only its
    # index for backward, where index_copy would keep all of `out`.
    inverse = torch.full((b * s,), out.shape[0], dtype=torch.long, device=out.device)
    inverse[blocks.q_index] = torch.arange(out.shape[0], device=out.device)
    context = torch.cat([out, out.new_zeros(1, *out.shape[1:])]).index_select(0, inverse)
    return row_major(context.view(b, s, *out.shape[1:]).transpose(0, 1))  # [.., heads, value size] (MLA's own)


def per_block(blocks: Blocks, attend_one: Callable) -> Callable:
    """An `attend` for `attend_blocks` that loops over the blocks (the lengths are on the host), calling
    `attend_one(q, k, v, q_positions, k_positions)` for each."""

    def attend(q, k, v):
        q_lengths, k_lengths = blocks.q_lengths, blocks.k_lengths
        pieces = zip(
            q.split(q_lengths),
            k.split(k_lengths),
            v.split(k_lengths),
            blocks.q_positions.split(q_lengths),
            blocks.k_positions.split(k_lengths),
            strict=True,
        )
        return torch.cat([attend_one(*piece) for piece in pieces])

    return attend


class SDPAttention(DotProductAttention):
    """Drop-in for DotProductAttention (its constructor sets heads per partition and the softmax scale)."""

    has_score_bias = False  # `score_bias` adds to the scores (the varlen kernel takes none)

    def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs) -> None:
        # MLA's head sizes (`models.mla`): its q / k size comes in its softmax scale, its value size is kv_channels
        local = without_window(config)
        local.context_parallel_size = 1  # the parent asserts CP == 1; context parallelism is done here
        super().__init__(local, *args, **kwargs)
        self.config = config
        self.window = layer_window(config, self.layer_number)  # None: the whole causal context
        mark_sinks(self)

    def score_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor | None:
        """An additive [heads, sq, sk] bias on the scores of queries and keys at these position ids; none here."""
        return None

    def _sdpa(self, q, k, v, mask=None, causal=False):
        """q [b, heads, sq, d], k/v [b, heads, sk, d]; Megatron's dropout and scale; with sinks, their explicit
        softmax (`attention_with_sinks`: no mask is causal, aligned at the end, as `causal` is for sq == sk)."""
        dropout = self.attention_dropout.p if self.training else 0.0
        if self.softmax_offset is not None:
            return attention_with_sinks(q, k, v, self.softmax_offset, self.softmax_scale, mask, dropout)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=self.softmax_scale
        )

    def _score_mask(self, q_positions: torch.Tensor, k_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDPA's mask for queries and keys at these position ids: causal (by position) and within the window, as
        booleans, or with the score bias (ALiBi) as additive floats."""
        allowed = window_allowed(q_positions, k_positions, self.window or q_positions.numel() + k_positions.numel())
        if not self.has_score_bias:
            return allowed
        bias = self.score_bias(q_positions, k_positions).to(dtype)
        return bias.masked_fill(~allowed.to(bias.device), float("-inf"))

    def _block(self, q, k, v, q_positions, k_positions) -> torch.Tensor:
        """One block's attention: q [Lq, heads, d], k/v [Lk, heads, d] -> [Lq, heads, d]. Fewer queries than keys
        (a rejected response after its prompt's keys) run as a square causal call with zero queries in front,
        whose outputs are dropped: no [Lq, Lk] mask is built or kept for backward (a mask would be, on CPU). A
        score bias (ALiBi) or a window takes a mask by position ids."""
        sq, sk = q.shape[0], k.shape[0]
        if self.has_score_bias or self.window:  # ALiBi's bias is a dense [heads, Lq, Lk] score term anyway
            mask = self._score_mask(q_positions.to(q.device), k_positions.to(q.device), q.dtype)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            return self._sdpa(q, k, v, mask=mask).squeeze(0).transpose(0, 1)
        if sq < sk:
            q = torch.cat([q.new_zeros(sk - sq, *q.shape[1:]), q])
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = self._sdpa(q, k, v, causal=True)
        return out.squeeze(0).transpose(0, 1)[sk - sq :]

    def _blocks(self, query, key, value, blocks: Blocks) -> torch.Tensor:
        window_ok = self.window is None or varlen_takes_window()
        plain = not self.has_score_bias and self.softmax_offset is None  # the varlen kernel takes neither
        if plain and window_ok and varlen_kernel(query) is not None:
            attend = lambda q, k, v: causal_varlen(
                q, k, v, blocks.cu_q, blocks.cu_k, blocks.max_q, blocks.max_k, self.softmax_scale, self.window
            )
        else:
            attend = per_block(blocks, self._block)
        context = attend_blocks(query, key, value, blocks, attend)
        return context.reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        """query [sq, b, heads, d], key/value [sk, b, groups, d] -> context [sq, b, heads * d]; packed (THD):
        query [t, heads, d], key/value [t, groups, d] -> [t, heads, d]."""
        if attention_bias is not None or attention_mask is not None:
            raise NotImplementedError(
                f"{type(self).__name__} takes no attention mask or bias (causal rows, THD or blocks)"
            )
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        heads = lambda x, dim: x.repeat_interleave(repeat, dim=dim) if repeat > 1 else x  # GQA: groups -> heads
        if isinstance(packed_seq_params, BlockAttention):
            return self._blocks(query, heads(key, 2), heads(value, 2), packed_seq_params.blocks)
        if packed_seq_params is not None:  # THD: a GPU's varlen kernel (mdpo sends THD only where it runs)
            p = packed_seq_params
            return causal_varlen(
                query,
                heads(key, 1),
                heads(value, 1),
                p.cu_seqlens_q,
                p.cu_seqlens_kv,
                p.max_seqlen_q,
                p.max_seqlen_kv,
                self.softmax_scale,
                self.window,
            )
        sq, b = query.shape[0], query.shape[1]
        if self.config.context_parallel_size > 1:  # gather the groups, then repeat: less to communicate
            key, value = (self._gather_sequence(t) for t in (key, value))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, heads(key, 2), heads(value, 2)))  # [b, n, s, d]
        if self.config.context_parallel_size > 1:
            context = self._context_parallel_attention(q, k, v)
        elif self.has_score_bias or self.window:
            positions = torch.arange(sq, device=query.device)
            context = self._sdpa(q, k, v, mask=self._score_mask(positions, positions, q.dtype))
        else:
            context = self._sdpa(q, k, v, causal=True)
        return row_major(context.permute(2, 0, 1, 3)).view(sq, b, self.hidden_size_per_partition)

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
            q_part = q[:, :, part * half : (part + 1) * half]
            mask = causal_lower_right(half, end)
            if self.window or self.softmax_offset is not None:  # the chunk's own positions against every key's
                window = self.window or end
                mask = window_allowed(torch.arange(end - half, end), torch.arange(end), window).to(q.device)
            out.append(self._sdpa(q_part, k[:, :, :end], v[:, :, :end], mask=mask))
        return torch.cat(out, dim=2)


class ALiBiAttention(SDPAttention):
    """SDPA with ALiBi: score(i, j) += slope_h * (position_j - position_i). Each TP rank holds the slopes of its own
    heads; the bias depends only on position ids, so packed rows and shared prompts need nothing more."""

    has_score_bias = True

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        per_rank = self.num_attention_heads_per_partition
        first = parallel_state.get_tensor_model_parallel_rank() * per_rank
        slopes = alibi_slopes(config.num_attention_heads)[first : first + per_rank]
        self.register_buffer("slopes", slopes, persistent=False)  # not a weight: kept out of checkpoints

    def score_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        distance = (k_positions[None, :] - q_positions[:, None]).to(self.slopes.device, torch.float32)
        return self.slopes[:, None, None] * distance


class LocalAttention(DotProductAttention):
    """Megatron's unfused attention (materialises [b, heads, sq, sk] scores), with blocks attended block by block:
    each block gets its own small causal mask, so packed rows and shared prompts cost what their sequences do. A
    window is a mask by position ids (plain rows too)."""

    def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs) -> None:
        # MLA's head sizes (`models.mla`): its q / k size comes in its softmax scale, its value size is kv_channels
        super().__init__(without_window(config), *args, **kwargs)
        self.window = layer_window(config, self.layer_number)
        mark_sinks(self)

    def _mask(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Megatron's mask (True = masked), [1, 1, sq, sk]: causal by position, within the window."""
        window = self.window or q_positions.numel() + k_positions.numel()
        return ~window_allowed(q_positions, k_positions, window)[None, None]

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if not isinstance(packed_seq_params, BlockAttention):
            if self.window and attention_mask is None:
                positions = torch.arange(query.shape[0], device=query.device)
                attention_mask = self._mask(positions, positions)
            return row_major(
                super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
            )
        blocks = packed_seq_params.blocks

        def attend_one(q, k, v, q_positions, k_positions):
            mask = self._mask(q_positions.to(q.device), k_positions.to(q.device))
            out = super(LocalAttention, self).forward(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mask)
            return out.squeeze(1).view(q.shape)

        context = attend_blocks(query, key, value, blocks, per_block(blocks, attend_one))
        return context.reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)


def with_core_attention(spec, core_attention: type[DotProductAttention]):
    """A copy of a local GPT layer spec whose self-attention uses another core attention class."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
