"""Multi-latent attention (DeepSeek-V2 / V3, Kimi K2, Moonlight): Megatron-Core's `MLASelfAttention` on mdpo's local
layers, with mdpo's core attentions (`models.attention`) and the rows of every layout.

Megatron's MLA owns its RoPE (plain or yarn, on the qk_rope_head_dim part of each head, the key's part shared by the
heads), so GPTModel hands it no rotary table. Its rotation reads the table at each token's index in the row, which is
right for plain rows; for rows in blocks (shared prompts, packed rows: `BlockAttention`) `PositionedGPTModel` hands
every layer the tokens' position ids in the rotary slot instead, and `LatentSelfAttention` reads its table at them.
Megatron's THD path squeezes [t, 1, ...] rows and is never taken: mdpo sends MLA models blocks
(`gpt.packs_as_thd`).

The q and kv down projections are whole on every TP rank (`LatentDownProjection`, Megatron's replicated `Linear`,
as Transformer Engine's layers make them "duplicated"), not the local spec's column-parallel ones: those gather
their output over TP, whose backward keeps each rank's own columns, so the RoPE key (the kv latent's last columns,
used by every rank's heads) would get the gradient of one rank's heads only. Replicated, under sequence parallelism
(which Megatron's MoE layers need at TP > 1), each rank projects its own tokens, Megatron gathers the RoPE key over
the sequence with a reduce-scatter backward that sums every rank's heads, and the weights' gradients are summed over
TP (`sequence_parallel` weights, as the norms'). Without it (a dense MLA model at TP > 1) each rank projects every
token: the q latent and the kv latent's first columns feed column-parallel up projections, whose input gradient
Megatron all-reduces over TP, and `LatentDownProjection` sums the RoPE key's own gradient over TP, so the weights'
and the input's gradients are whole and equal on every rank, as TP's other layers leave them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import get_pg_size

from mdpo.config import ModelConfig
from mdpo.models.attention import BlockAttention


def mla_fields(model: ModelConfig) -> dict:
    """MLATransformerConfig's fields of a model with MLA: the latent ranks and head parts, its (only) q and kv latent
    norms, and its RoPE as Megatron's own rotary embedding takes it (yarn's missing parameters: transformers'
    defaults; without both mscales, transformers' attention factor 0.1 ln(factor) + 1, which is Megatron's at mscale
    1 and mscale_all_dim 0: `ModelConfig` refuses the other cases)."""
    yarn = model.rope_scaling == "yarn"
    both = yarn and bool(model.rope_mscale and model.rope_mscale_all_dim)
    return dict(
        multi_latent_attention=True,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_nope_head_dim,
        qk_pos_emb_head_dim=model.qk_rope_head_dim,
        v_head_dim=model.v_head_dim,
        rope_type="yarn" if yarn else "rope",
        rotary_base=model.rope_theta,
        rotary_scaling_factor=model.rope_scaling_factor if yarn else 1.0,
        original_max_position_embeddings=model.rope_original_max_position_embeddings,
        beta_fast=model.rope_beta_fast or 32.0,
        beta_slow=model.rope_beta_slow or 1.0,
        mscale=model.rope_mscale if both else 1.0,
        mscale_all_dim=model.rope_mscale_all_dim if both else 0.0,
    )


class TokenPositionRotary(torch.nn.Module):
    """MLA's rotary embedding read at each token's position id while `positions` [s, b] is set, else as it is: the
    table [s, b, 1, d] (with yarn's cos / sin scale, as Megatron's yarn returns it)."""

    def __init__(self, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self.positions: torch.Tensor | None = None

    def get_rotary_seq_len(self, *args: object, **kwargs: object) -> int:
        return self.rotary.get_rotary_seq_len(*args, **kwargs)

    def forward(self, seq_len: int, packed_seq: bool = False):
        if self.positions is None:
            return self.rotary(seq_len, packed_seq=packed_seq)
        out = self.rotary(max(seq_len, int(self.positions.max()) + 1), packed_seq=packed_seq)
        table, scale = out if isinstance(out, tuple) else (out, None)
        table = table[:, 0][self.positions.to(table.device)]
        return table if scale is None else (table, scale)


class GradientSummedOverTP(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over the TP group. Megatron's copy to the TP region
    all-reduces a contiguous copy of a non-contiguous gradient and returns the original unsummed (measured: the RoPE
    key's gradient, a slice of the kv latent's, came out of it unchanged)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: torch.distributed.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class LatentDownProjection(ReplicatedLinear):
    """MLA's q or kv down projection, whole on every TP rank (no bias). Of the kv one, the last `rope_columns` (the
    heads' shared RoPE key) get their gradient summed over TP when each rank projects every token (TP > 1 without
    sequence parallelism): every rank's heads use them (module docstring)."""

    def __init__(self, *args: object, rope_columns: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.rope_columns = rope_columns

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = self.project(x)
        if self.rope_columns and not self.config.sequence_parallel and get_pg_size(self.tp_group) > 1:
            latent, rope = out.split([out.shape[-1] - self.rope_columns, self.rope_columns], dim=-1)
            out = torch.cat([latent, GradientSummedOverTP.apply(rope, self.tp_group)], dim=-1)
        return out, None


class LatentSelfAttention(MLASelfAttention):
    """Megatron's MLASelfAttention whose RoPE follows the position ids `PositionedGPTModel` hands it (in the rotary
    slot, for rows in blocks) and whose rows in blocks reach Megatron's projections as the plain [s, b] rows they
    are: only the core attention reads the blocks. Its down projections are the spec's (`LatentDownProjection`, or
    LoRA's on it): Megatron's MLA takes only its own classes there, so it builds its replicated `Linear` and they
    are replaced by the spec's, of the same sizes."""

    def __init__(self, config, submodules: MLASelfAttentionSubmodules, *args: object, **kwargs: object) -> None:
        megatrons = dataclasses.replace(
            submodules, linear_q_down_proj=ReplicatedLinear, linear_kv_down_proj=ReplicatedLinear
        )
        super().__init__(config, megatrons, *args, **kwargs)
        common = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False, is_expert=False)
        for name, rope_columns in (("linear_q_down_proj", 0), ("linear_kv_down_proj", config.qk_pos_emb_head_dim)):
            built = getattr(self, name, None)  # no q down projection without q_lora_rank
            if built is not None:
                shape = (built.in_features, built.out_features)
                module = build_module(
                    getattr(submodules, name), *shape, tp_group=built.tp_group, rope_columns=rope_columns, **common
                )
                setattr(self, name, module)
        self.rotary_pos_emb = TokenPositionRotary(self.rotary_pos_emb)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        self.rotary_pos_emb.positions = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self.rotary_pos_emb.positions = None

    def get_query_key_value_tensors(
        self, hidden_states, key_value_states=None, position_ids=None, packed_seq_params=None, **kwargs
    ):
        if isinstance(packed_seq_params, BlockAttention):
            packed_seq_params = None
        return super().get_query_key_value_tensors(
            hidden_states, key_value_states, position_ids, packed_seq_params, **kwargs
        )
