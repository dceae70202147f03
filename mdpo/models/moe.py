"""Mixture-of-experts layers: Megatron-Core's router, token dispatcher and experts, configured to route as
transformers' Qwen3-MoE, Qwen2-MoE and Mixtral do (Qwen2-MoE's gated shared expert: Megatron's SharedExpertMLP), and
the routers (spec entries) that give the objective a load-balancing loss.

Routing (dropless: no capacity factor, so every layout routes every token the same): a softmax router without bias
over all experts, top-k. Renormalised top-k weights (Mixtral; Qwen3-MoE's `norm_topk_prob: true`) equal a softmax
over the k top logits, Megatron's `moe_router_pre_softmax=False`; unrenormalised ones are the softmax over all experts
taken at the top k, `moe_router_pre_softmax=True`. DeepSeek-V3's router is Megatron's sigmoid one: the experts
chosen by sigmoid scores plus the checkpoint's correction bias (Megatron's `expert_bias`), within the best groups of
experts, the chosen scores renormalised and scaled by `routed_scaling_factor`. The bias is never trained by the
gradient: it stays as loaded (`model.router_bias_update_rate: 0`), or moves after every step as DeepSeek-V3's
auxiliary-loss-free balancing moves it, by Megatron's own update (`finalize_model_grads`: bias += rate x sign(mean
load - load), each expert's load the tokens routed to it in the step's forwards as TRL's batch holds them, summed
over the TP, CP and DP ranks), from the counts `ExpertBiasRouter` keeps.

Two kinds of load-balancing loss (`dpo.router_aux_loss_type`):
- `transformers`: transformers' `load_balancing_loss_func`, which TRL's DPOTrainer adds to the DPO loss: one
  Switch-style term over the routing of every layer of a forward at once (experts x sum over experts of the fraction
  of routed token slots x the mean router probability). mdpo takes it per pair (the forward TRL runs with one pair
  per device batch: its chosen and rejected sequences), so it is the same for any micro-batch, packing or
  data-parallel split. Each `RecordingRouter` records its two sums per pair and expert (`RouterSums`), weighted by
  the tokens TRL's batch would hold (padding 0, a shared prompt twice), and the last stage combines them
  (`pair_aux_losses`): exact with one pipeline stage and routers that run once per forward.
- `megatron` / `seq`: Megatron-Core's own per-layer `aux_loss` / DeepSeek-V3's `seq_aux_loss`, which each layer's
  `MicroBatchRouter` attaches to its own activations (Megatron's `MoEAuxLossAutoScaler`): any pipeline layout,
  recompute included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

from mdpo.config import ModelConfig

# Megatron's load-balancing types for mdpo's `dpo.router_aux_loss_type` (transformers' pooled formula is mdpo's own,
# recorded by `RecordingRouter`; Megatron's routers then add none)
MEGATRON_BALANCING = {"transformers": "none", "megatron": "aux_loss", "seq": "seq_aux_loss"}


def moe_fields(
    model: ModelConfig,
    ep: int,
    etp: int | None,
    grouped_gemm: bool,
    dispatcher: str,
    balancing: str = "transformers",
    coef: float = 0.0,
) -> dict:
    """The MoE part of Megatron's TransformerConfig: transformers' routing (see the module docstring), `moe_layers`
    as Megatron's per-layer pattern, and Megatron's own router loss when `balancing` is `megatron` (per-layer
    `aux_loss`) or `seq` (DeepSeek-V3's `seq_aux_loss`) with weight `coef` (0: none)."""
    if not model.is_moe:
        # Dense model: no experts, but megatron rejects variable lengths with the default (allgather) dispatcher.
        return {"moe_token_dispatcher_type": "alltoall"}
    layers = set(model.expert_layers())
    megatron = MEGATRON_BALANCING[balancing] if coef > 0 else "none"
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_topk,
        moe_ffn_hidden_size=model.expert_width,
        # Qwen2-MoE's shared expert: Megatron's SharedExpertMLP, sigmoid(x gate^T) x its SwiGLU MLP(x), added to the
        # routed experts' output as transformers' Qwen2MoeSparseMoeBlock adds it
        moe_shared_expert_intermediate_size=model.shared_expert_intermediate_size,
        moe_shared_expert_gate=model.shared_expert_intermediate_size is not None and model.shared_expert_gate,
        moe_layer_freq=[int(i in layers) for i in range(model.num_hidden_layers)],
        moe_router_score_function=model.router_score,
        moe_router_pre_softmax=model.router_score == "softmax" and not model.norm_topk_prob,
        # DeepSeek-V3's: the score bias that chooses the experts, a checkpoint's, updated after each step at this rate
        moe_router_enable_expert_bias=model.router_expert_bias,
        moe_router_bias_update_rate=model.router_bias_update_rate,
        moe_router_topk_scaling_factor=model.routed_scaling_factor if model.routed_scaling_factor != 1.0 else None,
        moe_router_num_groups=model.router_groups,
        moe_router_group_topk=model.router_group_topk or model.router_groups,
        moe_router_load_balancing_type=megatron,
        moe_aux_loss_coeff=coef if megatron != "none" else 0.0,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=grouped_gemm,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


@dataclass
class RouterSums:
    """What the routers of one model chunk record in a forward: each token's count in each pair (`weights`
    [tokens, pairs], in the routers' token order: [s x b], this rank's share; a token a tree shares counts in every
    pair holding it; None: record nothing, as in a reference's forward), and per MoE layer, per pair and expert, the
    weighted count of token slots routed to the expert (no gradient) and the weighted sum of its router probability."""

    weights: torch.Tensor | None = None
    counts: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)

    def start(self, weights: torch.Tensor | None) -> None:
        self.weights, self.counts, self.probs = weights, [], []

    def per_pair(self, values: torch.Tensor) -> torch.Tensor:
        """[tokens, experts] -> [pairs, experts]: each pair's weighted sum."""
        return self.weights.t() @ values.float()


class ExpertBiasRouter(TopKRouter):
    """Megatron's top-k router, counting for its expert bias's update (DeepSeek-V3's score correction; Megatron's
    `finalize_model_grads` moves it by `moe_router_bias_update_rate`) each token routed to an expert with its weight
    in `load_weights` ([tokens] in the routers' order: its count among the tokens TRL's batch would hold, a pair's
    prompt twice, padding 0, so that every row layout counts the same), in forwards with gradients. None (a
    reference's forward, an expert group's echo): nothing counted. Megatron-Core 0.16.1's own count would take
    a shared prompt once, and counts wrongly under a padding mask (router.py:542 ands [tokens, experts] with
    [tokens]). Every MoE layer's router is one."""

    load_weights: torch.Tensor | None = None

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None) -> None:
        if self.load_weights is None or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            if self.local_tokens_per_expert.dtype != torch.float32:  # bf16 (Float16Module) counts inexactly
                self.local_tokens_per_expert.data = self.local_tokens_per_expert.data.float()
            self.local_tokens_per_expert += self.load_weights.float() @ routing_map.float()


def count_loads(model: torch.nn.Module, weights: torch.Tensor | None) -> None:
    """The token weights the routers of `model` count their next forwards' loads with (`ExpertBiasRouter`)."""
    for module in model.modules():
        if isinstance(module, ExpertBiasRouter):
            module.load_weights = weights


class RecordingRouter(ExpertBiasRouter):
    """Megatron's top-k router that also records this layer's sums for transformers' pooled load-balancing loss
    (with Megatron's own scores for an aux loss: the softmax over all experts and its top k) into `sums` when it
    has token weights. A spec entry (`functools.partial(RecordingRouter, sums=...)` as MoESubmodules' router)."""

    def __init__(self, *args: object, sums: RouterSums, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.sums = sums

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask)
        if self.sums.weights is not None:
            flat = logits.view(-1, self.config.num_moe_experts)
            chosen, scores = compute_routing_scores_for_aux_loss(flat, self.topk, self.score_function)
            self.sums.counts.append(self.sums.per_pair(chosen).detach())
            self.sums.probs.append(self.sums.per_pair(scores))
        return probs, routing_map


class MicroBatchRouter(ExpertBiasRouter):
    """Megatron's top-k router whose own load-balancing losses (`aux_loss`, `seq_aux_loss`: each layer's over the
    micro-batch's tokens, padding left out) reach the gradient through Megatron's `MoEAuxLossAutoScaler` as they are,
    not multiplied by the micro-batch's token count as under `calculate_per_token_loss`: mdpo's gradients are
    divided by the step's pairs, and its step weights each micro-batch's losses by the coefficient the run sets
    before the step (`training.experts`). A spec entry, in every pipeline stage: no stage needs another's routing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.calculate_per_token_loss = False


def mark_experts(gpt: torch.nn.Module) -> None:
    """Experts' weights as Megatron marks them under expert parallelism (`allreduce=False`: reduced over the expert
    data-parallel group, their own optimizer), at EP = 1 too, where that group is the data-parallel one: the
    optimizer is then chained the same way at every EP size, so a checkpoint resumes at another. An expert's fc2
    bias (gpt-oss's; experts with biases are whole, ETP = 1) is fixed where Megatron's row-parallel layer marks it
    as a dense bias: never `sequence_parallel` (finalize_model_grads would sum its gradient over the TP ranks, whose
    experts are others or whose gradients are their own tokens'), and no TP duplicate (Megatron's expert optimizer
    asks the dense TP group, so the gradient norm, and the clipping by it, counted the first TP rank's only)."""
    for name, param in gpt.named_parameters():
        if ".experts." in name:
            param.allreduce = False
            param.sequence_parallel = False
            if not getattr(param, "tensor_model_parallel", False):
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1


def routers_order(values: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[rows, s, ...] per-token values (this context-parallel rank's share) -> the routers' order: [s, rows]
    flattened (trailing dimensions kept), this TP rank's part of the sequence under sequence parallelism."""
    order = values.transpose(0, 1).contiguous()
    if sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        order = order.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()]
    return order.reshape(-1, *values.shape[2:])


def load_balancing_loss(counts: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, num_experts: int):
    """transformers' `load_balancing_loss_func` from its sums over all layers, for each row (a pair): `counts`
    [.., E] the weighted token slots routed to each expert, `probs` [.., E] the weighted router probabilities,
    `tokens` [..] the weighted tokens of every layer. experts x sum_e (counts_e / tokens) (probs_e / tokens)."""
    share = lambda sums: sums / tokens[..., None]
    return num_experts * (share(counts) * share(probs)).sum(-1)


def pair_aux_losses(sums: RouterSums, num_experts: int, sequence_parallel: bool) -> torch.Tensor:
    """Each pair's load-balancing loss [pairs] from every MoE layer's recorded sums, summed over the ranks that hold
    parts of its tokens (TP ranks under sequence parallelism, CP ranks). The probability sums are reduced with an
    identity backward, as the log-probs are: each rank's copy of the loss sends gradients to its own tokens."""
    counts, probs = torch.stack(sums.counts).sum(0), torch.stack(sums.probs).sum(0)
    tokens = sums.weights.sum(0) * len(sums.counts)
    groups = []
    if sequence_parallel:
        groups.append(parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_context_parallel_world_size() > 1:
        groups.append(parallel_state.get_context_parallel_group())
    for group in groups:
        totals = torch.cat([counts, tokens[:, None]], dim=1)
        torch.distributed.all_reduce(totals, group=group)
        counts, tokens = totals[:, :-1], totals[:, -1]
        probs = reduce_from_tensor_model_parallel_region(probs, group)
    return load_balancing_loss(counts, probs, tokens, num_experts)
