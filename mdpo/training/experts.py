"""What a mixture-of-experts policy adds to a run, behind one object (`Experts`): the routers its MoE layers are built
with, its load-balancing loss (transformers' pooled formula or Megatron-Core's per-layer losses, `models.moe`) and
expert parallelism's rule that every rank of an expert group runs as many forwards. The loop, the step and the
micro-batching call its hooks and know nothing else of experts; a dense model has none (None).

Megatron's per-layer losses (`megatron`: aux_loss, `seq`: seq_aux_loss) are each micro-batch's, attached in every
layer's backward (`MicroBatchRouter`). The objective takes their mean over the step's micro-batches: the routers'
coefficient is set before each step to coef x the step's pairs / its micro-batches, since the gradients are divided
by the pairs. They are logged from Megatron's own tracker (each layer's loss, summed over micro-batches and over the
ranks holding parts of them) as `aux_loss`, and `loss` includes coef x aux_loss, as TRL logs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import RouterBuilder
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.utils import get_model_config

from mdpo.config import TrainConfig
from mdpo.data.batching import MicroBatch
from mdpo.models.moe import (
    MicroBatchRouter,
    RecordingRouter,
    RouterSums,
    count_loads,
    pair_aux_losses,
    routers_order,
)

# Megatron's tracker names of its per-layer losses
_TRACKED = {"megatron": "load_balancing_loss", "seq": "seq_load_balancing_loss"}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Experts:
    """A MoE policy's routers and load-balancing loss (`balancing`: transformers, megatron or seq, weight `coef`;
    0: none), its expert-parallel size `ep`, and whether its routers count tokens for their expert bias's update
    (`counts`: model.router_bias_update_rate > 0; Megatron updates the bias in `finalize_model_grads`)."""

    def __init__(self, balancing: str, coef: float, num_experts: int, ep: int, counts: bool = False) -> None:
        self.balancing, self.coef, self.num_experts, self.ep = balancing, coef, num_experts, ep
        self.counts = counts
        self.sums = RouterSums() if self.pooled else None  # what the policy's recording routers fill
        self.microbatches = 1  # the step's micro-batches over every DP rank (Megatron's losses are their mean)

    @classmethod
    def of(cls, cfg: TrainConfig, ep: int) -> Experts | None:
        """The run's experts; None for a dense model."""
        if not cfg.model.is_moe:
            return None
        counts = cfg.model.router_bias_update_rate > 0
        return cls(cfg.router_aux_loss_type, cfg.router_aux_loss_coef, cfg.model.num_experts, ep, counts)

    @property
    def pooled(self) -> bool:
        """transformers' pooled loss, recorded per pair by the routers and added by the objective."""
        return self.balancing == "transformers" and self.coef > 0

    @property
    def per_layer(self) -> bool:
        """Megatron's per-layer losses, attached by the routers themselves."""
        return self.balancing in _TRACKED and self.coef > 0

    def router(self) -> RouterBuilder | None:
        """What the policy's MoE layers route with (a reference's route with Megatron's plain TopKRouter)."""
        if self.pooled:
            return partial(RecordingRouter, sums=self.sums)
        return MicroBatchRouter if self.per_layer else None

    def config_fields(self) -> dict:
        """The policy's TransformerConfig fields of Megatron's router losses (`models.gpt.transformer_config`)."""
        return {"balancing": self.balancing, "aux_coef": self.coef if self.per_layer else 0.0}

    @property
    def components(self) -> tuple[str, ...]:
        """The per-pair metric sums the objective adds: transformers' loss is a pair's own."""
        return ("aux_loss",) if self.pooled else ()

    # ------------------------------------------------------------------ a micro-batch

    def before_forward(self, batch: MicroBatch, model: torch.nn.Module) -> None:
        """transformers' loss: the routers record this micro-batch's sums per pair, weighted as TRL's batch holds
        its tokens, in their token order. The expert bias's update counts the tokens of every micro-batch but an
        echo (a repeat), weighted as that batch holds them too."""
        sequence_parallel = get_model_config(model).sequence_parallel
        if self.counts:
            count_loads(model, None if batch.echo else routers_order(batch.token_weights, sequence_parallel))
        if self.pooled:
            self.sums.start(routers_order(batch.pair_weights, sequence_parallel))

    def pair_term(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """transformers' loss after the forward: (coef x the sum of each pair's loss, the sum of each pair's loss),
        added as TRL adds it to a one-pair batch's loss; None for the per-layer losses (attached in the routers).
        The routers then record nothing until the next policy forward: LoRA's reference (the policy's own chunks,
        adapters off) and a recomputed forward run through them too."""
        if not self.pooled:
            return None
        per_pair = pair_aux_losses(self.sums, self.num_experts, get_model_config(model).sequence_parallel)
        self.sums.start(None)
        return self.coef * per_pair.sum(), per_pair.sum()

    # ------------------------------------------------------------------ a step

    def before_step(self, microbatches: list[MicroBatch], chunks: list[torch.nn.Module]) -> None:
        """Megatron's losses: this step's coefficient, coef x pairs / micro-batches over the DP ranks (the ranks of
        a DP rank's TP, CP and PP groups run the same micro-batches)."""
        if not self.per_layer:
            return
        counts = torch.tensor([len(microbatches), sum(mb.num_pairs for mb in microbatches)], device=_device())
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        self.microbatches, pairs = (int(c) for c in counts.tolist())
        get_model_config(chunks[0]).moe_aux_loss_coeff = self.coef * pairs / self.microbatches

    def complete(self, record: dict[str, float]) -> None:
        """Megatron's losses: the step's `aux_loss` (each micro-batch's sum over layers, their mean) from Megatron's
        tracker, summed over every rank (pipeline stages hold other layers, TP/CP ranks parts of a micro-batch's
        tokens, DP ranks other micro-batches), and `loss` with coef x aux_loss in it."""
        if not self.per_layer:
            return
        tracked = get_moe_layer_wise_logging_tracker().get(_TRACKED[self.balancing])
        total = tracked["values"].sum()[None] if tracked is not None else torch.zeros(1, device=_device())
        torch.distributed.all_reduce(total)
        clear_aux_losses_tracker()
        aux = total.item() / self.microbatches
        record["aux_loss"] = aux
        record["loss"] += self.coef * aux

    # ------------------------------------------------------------------ expert parallelism

    def in_step(self, batches: list[MicroBatch], rebuild: Callable[[int], list[MicroBatch]]) -> list[MicroBatch]:
        """Every rank of an expert group runs as many forwards as the rank with the most (each MoE layer's
        all-to-all joins them in every forward): `rebuild(n)` splits micro-batches where there are pairs enough,
        and a rank short of pairs repeats its last one as an `echo` (forward-only passes: its results are not
        counted, and it never reaches the loss)."""
        if self.ep == 1:
            return batches
        most = torch.tensor(len(batches), device=_device())
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        if int(most) > len(batches):
            batches = rebuild(int(most))
        return batches + [dataclasses.replace(batches[-1], echo=True)] * (int(most) - len(batches))
