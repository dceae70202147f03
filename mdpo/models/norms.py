"""The norms of the local layers: where they sit (before each sublayer, Llama's; after it, OLMo 2's; both, Gemma's:
`PostNormLayer`), what they span (a token's hidden state, one attention head, or a whole q / k projection:
`ProjectionNorm`) and how their weight scales (as it is, or 1 + w: `ZeroCenteredRMSNorm`), each as a spec entry of
Megatron-Core's TransformerLayer, with sequence and tensor parallelism.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


class TorchNorm:
    """Megatron's WrappedTorchNorm (torch's RMSNorm or LayerNorm, as `config.normalization` says) that also runs
    under sequence parallelism, which WrappedTorchNorm refuses. There each TP rank normalises its own part of the
    sequence, so its weight's gradient is a part of the sum: the weight (and bias) are marked `sequence_parallel`,
    as Megatron marks its fused and TE norms, and `finalize_model_grads` sums their gradients over the TP ranks."""

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs: object
    ) -> torch.nn.Module:
        plain = copy.copy(config)
        plain.sequence_parallel = False  # the norm's math is per token: the split changes only its gradient's sum
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        if config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm


class ZeroCenteredRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm: its weight w is stored centred on zero and scales by 1 + w, in float32 (transformers'
    Gemma3RMSNorm: the product before the cast to the input's dtype; Megatron's layernorm_zero_centered_gamma, which
    its torch norm refuses). Under sequence parallelism marked as `TorchNorm` marks its weight."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class ProjectionNorm(MegatronModule):
    """OLMo 2's q / k norm: one RMSNorm over a token's whole query (`heads="query"`) or key projection, every head
    together, where Megatron's qk_layernorm normalises each head. A TP rank holds some of the heads: the mean square
    is summed over the TP ranks (its gradient too, since every rank's outputs depend on it). The weight is whole on
    every rank (the HF tensor), each rank scaling its heads by its slice, so its gradient is a slice per rank: Megatron
    sums q_layernorm / k_layernorm gradients over TP (`finalize_model_grads`), which makes it whole."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *, heads: str) -> None:
        super().__init__(config)
        count = config.num_attention_heads if heads == "query" else config.num_query_groups
        self.width, self.eps = count * hidden_size, eps  # hidden_size: Megatron passes the head size
        self.weight = torch.nn.Parameter(torch.ones(self.width, dtype=config.params_dtype))
        self.tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        self.tp = config.tensor_model_parallel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., this rank's heads, head size] -> normalised over all ranks' heads, as HF's RMSNorm does (float32
        statistics, the result in x's dtype)."""
        local = x.shape[-2] * x.shape[-1]
        squares = x.float().pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp > 1:
            squares = dist_fn.all_reduce(squares, group=self.tp_group)
        normed = x.float() * torch.rsqrt(squares / self.width + self.eps)
        rank = parallel_state.get_tensor_model_parallel_rank() if self.tp > 1 else 0
        weight = self.weight[rank * local : (rank + 1) * local].view(x.shape[-2:])
        return (weight * normed).to(x.dtype)


@dataclass
class PostNormLayerSubmodules(TransformerLayerSubmodules):
    """A layer's submodules plus the norms of its attention's and its MLP's outputs."""

    post_self_attn_layernorm: ModuleSpec | type = TorchNorm
    post_mlp_layernorm: ModuleSpec | type = TorchNorm


class PostNormLayer(TransformerLayer):
    """Megatron's TransformerLayer with the attention's and the MLP's outputs normalised before their residual adds:
    x + norm(attention(x)), then h + norm(mlp(h)) (OLMo 2 and 3, whose norms before the sublayers are IdentityOp in
    its spec), or with both, x + norm(attention(norm(x))) (Gemma 2 and 3). The norms after run inside the layer's
    bias-dropout-add steps, so recompute and pipeline see Megatron's layer."""

    def __init__(self, config: TransformerConfig, submodules: PostNormLayerSubmodules, *args, **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        norm = lambda spec: build_module(
            spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.post_self_attn_layernorm = norm(submodules.post_self_attn_layernorm)
        self.post_mlp_layernorm = norm(submodules.post_mlp_layernorm)
        self.self_attn_bda = _normed_first(self.post_self_attn_layernorm, self.self_attn_bda)
        self.mlp_bda = _normed_first(self.post_mlp_layernorm, self.mlp_bda)


def _normed_first(norm: torch.nn.Module, bda: Callable) -> Callable:
    """Megatron's bias-dropout-add step (a function of (training, fused) giving f((output, bias), residual, p)) with
    the sublayer's output, its bias added, normalised before the dropout and the residual add."""

    def step(training: bool, fused: bool) -> Callable:
        add = bda(training, fused)

        def normed_add(output_with_bias, residual, prob):
            output, bias = output_with_bias
            return add((norm(output if bias is None else output + bias), None), residual, prob)

        return normed_add

    return step
