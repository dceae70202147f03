"""RoPE: its frequencies for a scaled RoPE (`rope_frequencies`), each layer's own (`RopeSelfAttention`), and in one
kernel each way on Megatron-Core's local layers (`model.fused_rope`).

A scaled RoPE (`model.rope_scaling`: llama3, linear, yarn) takes its inverse frequencies and its attention factor
(yarn's scale of cos and sin) from transformers' own initialisation (`ROPE_INIT_FUNCTIONS`) of the config.json
parameters the model holds, so they are exactly the HF model's: Megatron's rotary table is built from these inverse
frequencies, and the attention factor m, which scales q and k after rotation, is m^2 on every score (the layer's
softmax scale). Models whose window layers have a RoPE of their own (Gemma 3's local base, OLMo 3's unscaled window
layers beside yarn on the full ones) build one table of both, each layer taking its half.

Megatron's rotation (`rope_utils._apply_rotary_pos_emb_bshd`) is a chain of elementwise ops over q and over k: the
cos and sin of the table and their casts, two products, rotate_half's negation and concatenation, the sum and a
final concatenation, each a kernel reading and writing a q- or k-sized tensor, forward and backward. Transformer
Engine replaces it with its fused kernel (Megatron's `apply_rope_fusion`); without TE, `rotate_qk` is that same
function of Megatron's, q and k together, under torch.compile: one generated kernel forward and one backward
(Triton on a GPU, C++ loops on CPU), and nothing q-sized kept for backward, as before.
"""

from __future__ import annotations

import copy
import math

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mdpo.config import ModelConfig


def rope_frequencies(model: ModelConfig) -> tuple[torch.Tensor, float] | None:
    """A scaled RoPE's (inverse frequencies [rotary dims / 2], attention factor) by transformers' own initialisation;
    None without a scaling (Megatron's default frequencies are the same)."""
    if model.rope_scaling is None:
        return None
    rope = {"rope_type": model.rope_scaling, "rope_theta": model.rope_theta, **model.rope_parameters()}
    config = LlamaConfig(
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        head_dim=model.kv_channels,
        max_position_embeddings=model.max_position_embeddings,
        rope_parameters={**rope, "partial_rotary_factor": model.partial_rotary_factor},
    )
    with torch.device("cpu"):  # also where the model is built on the meta device (the converters)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[model.rope_scaling](config, "cpu")
    return inv_freq.float(), float(attention_factor)


def default_frequencies(theta: float, dims: int) -> torch.Tensor:
    """Unscaled RoPE's inverse frequencies [dims / 2] over the dims it rotates (Megatron's and transformers'
    default)."""
    return 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.float32, device="cpu") / dims))


def table_frequencies(model: ModelConfig) -> torch.Tensor | None:
    """The inverse frequencies Megatron's rotary table is built from where they are not its default: a scaled RoPE's;
    with a RoPE of the window layers' own (`model.window_rope_theta`: Gemma 3, OLMo 3), the other layers' and the
    window layers' side by side, so that the one table GPTModel hands every layer holds both (`layer_table`)."""
    scaled = rope_frequencies(model)
    if model.window_rope_theta is None:
        return None if scaled is None else scaled[0]
    full = default_frequencies(model.rope_theta, model.rotary_dim) if scaled is None else scaled[0]
    return torch.cat([full, default_frequencies(model.window_rope_theta, model.rotary_dim)])


def layer_table(table: torch.Tensor, windowed: bool) -> torch.Tensor:
    """A layer's own table from one of `table_frequencies`' pairs: Megatron repeats the frequencies, so the last dim is
    [other layers', window layers', other layers', window layers'], a quarter each."""
    parts = table.chunk(4, dim=-1)
    return torch.cat(parts[1::2] if windowed else parts[0::2], dim=-1)


def layer_softmax_scale(model: ModelConfig, windowed: bool) -> float | None:
    """A layer's softmax scale: 1 / sqrt(query_pre_attn_scalar or head size), times m^2 where a scaled RoPE has an
    attention factor m (yarn's multiplies cos and sin, so q and k after rotation) unless the layer has the window
    layers' own, unscaled, RoPE. None where that is Megatron's own 1 / sqrt(head size)."""
    scaled = rope_frequencies(model)
    factor = 1.0
    if scaled is not None and not (windowed and model.window_rope_theta is not None):
        factor = scaled[1] ** 2
    if factor == 1.0 and model.query_pre_attn_scalar is None:
        return None
    return factor / math.sqrt(model.query_pre_attn_scalar or model.kv_channels)


@torch.compile(dynamic=True)  # every micro-batch has its own length: one compiled graph for all of them
def rotate_qk(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [s, b, heads, d], key [s, b, groups, d], freqs [s, b or 1, 1, d] (Megatron's rotary table, per row
    position or per token) -> both rotated, exactly as Megatron's unfused rotation does it."""
    return _apply_rotary_pos_emb_bshd(query, freqs), _apply_rotary_pos_emb_bshd(key, freqs)


class RopeSelfAttention(SelfAttention):
    """Megatron's SelfAttention with its layer's RoPE, as its spec says:

    - `rope_table`: "full" or "window", its half of a table of two RoPEs (`table_frequencies`); None: a single one.
    - `softmax_scale`: its own (`layer_softmax_scale`), through its own copy of the config, which the core attention
      (any: mdpo's, Megatron's, Transformer Engine's) reads.
    - `fused` (`model.fused_rope` on the local layers): RoPE applied by `rotate_qk` to q and k as the QKV projection
      hands them out. The table reaches `get_query_key_value_tensors` through the instance for the length of one
      forward call only (Megatron then sees no table and skips its own rotation); a recomputed layer (full
      recompute) calls forward again with its own table. THD packs come with a per-token table
      (`PositionedGPTModel`), so the rotation needs no sequence boundaries: q is [t, 1, heads, d] until Megatron
      squeezes it.
    """

    _freqs: torch.Tensor | None = None  # GPTModel hands self-attention one table, for queries and keys alike

    def __init__(
        self,
        config: TransformerConfig,
        *args: object,
        rope_table: str | None = None,
        softmax_scale: float | None = None,
        fused: bool = False,
        **kwargs: object,
    ) -> None:
        if softmax_scale is not None:
            config = copy.copy(config)
            config.softmax_scale = softmax_scale
        super().__init__(config, *args, **kwargs)
        self.rope_table, self.fused = rope_table, fused

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if rotary_pos_emb is not None and self.rope_table is not None:
            rotary_pos_emb = layer_table(rotary_pos_emb, self.rope_table == "window")
        if not self.fused:
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
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
