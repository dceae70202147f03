"""The DPO step on Megatron-Core's schedule: forward_step_func and the loss functions it returns.

Contract (megatron/core/pipeline_parallel/schedules.py): `forward_step(data_iterator, model)` returns the stage's
output and a loss function that the last stage calls on it. With `calculate_per_token_loss=True` the loss
function returns (sum of per-pair losses, number of pairs, metrics): the schedule leaves the sum undivided and
`finalize_model_grads` divides the gradients by the global pair count, which makes the global-batch loss the
exact mean over pairs for any micro-batch count, DP size or PP size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from mdpo.config import DPOConfig, ModelConfig
from mdpo.data.batching import MicroBatch, in_frame
from mdpo.errors import MdpoError
from mdpo.loss import PairLosses, pair_losses, wpo_weights
from mdpo.models.attention import BlockAttention
from mdpo.training.experts import Experts
from mdpo.training.logprobs import SequenceStats, sequence_stats
from mdpo.training.metrics import SUM_FIELDS, pair_sums, turn_fields, turn_sums


@dataclass
class RewardMean:
    """bco_pair's shift when `dpo.bco_delta` is None: the running mean of past steps' implicit rewards (chosen and
    rejected alike), each step's global-batch mean counted once, as BCO and TRL 0.x keep it per batch. It is
    updated after each applied step from the step's DP-reduced metrics, so it is the same on every rank and for
    every layout, and the step uses the mean of the steps before it (TRL also folds in the current batch, which
    would need the policy's rewards before its own forward). Saved in checkpoints: resume is exact."""

    mean: float = 0.0
    steps: int = 0

    def update(self, chosen_reward: float, rejected_reward: float) -> None:
        self.steps += 1
        self.mean += ((chosen_reward + rejected_reward) / 2 - self.mean) / self.steps

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean, self.steps = float(state["mean"]), int(state["steps"])


@dataclass(frozen=True)
class DPOObjective:
    """The configured preference objective (`dpo` checked itself when built, so a step only computes);
    `components` name the per-pair terms logged besides `loss`; `reward_mean` is bco_pair's running shift;
    `experts` a MoE policy's load-balancing loss and its hooks (None: a dense model)."""

    dpo: DPOConfig
    vocab_size: int
    reward_mean: RewardMean = field(default_factory=RewardMean)
    experts: Experts | None = None
    turns: int = 1  # the data's turn positions (multi-turn preferences): reward accuracy is logged per position

    @classmethod
    def from_config(
        cls, dpo: DPOConfig, vocab_size: int, experts: Experts | None = None, turns: int = 1
    ) -> DPOObjective:
        return cls(dpo, vocab_size, experts=experts, turns=turns)

    @property
    def components(self) -> tuple[str, ...]:
        types = self.dpo.loss_types
        names = tuple(f"loss/{t}" for t in types) if len(types) > 1 else ()
        aux = self.experts.components if self.experts is not None else ()
        return names + (("nll_loss",) if self.dpo.rpo_alpha > 0 else ()) + aux

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of a step's metric sums (`MetricSums`)."""
        return SUM_FIELDS + self.components + turn_fields(self.turns)

    def before_step(self, microbatches: list[MicroBatch], chunks: list[torch.nn.Module]) -> None:
        """Before a training step's schedule: what the step's load-balancing loss needs (`Experts.before_step`)."""
        if self.experts is not None:
            self.experts.before_step(microbatches, chunks)

    def complete(self, record: dict[str, float]) -> dict[str, float]:
        """A training step's record with what is not a metric sum: Megatron's per-layer load-balancing losses
        (`Experts.complete`)."""
        if self.experts is not None:
            self.experts.complete(record)
        return record

    def __call__(
        self,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths,
        rejected_lengths,
        *,
        sft_chosen=None,
        pair_weights=None,
        rankings=None,
    ) -> PairLosses:
        """The per-pair losses, rewards and loss terms (`loss.pair_losses`) with bco_pair's running shift."""
        return pair_losses(
            self.dpo,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            chosen_lengths,
            rejected_lengths,
            sft_chosen=sft_chosen,
            pair_weights=pair_weights,
            bco_mean=self.reward_mean.mean,
            rankings=rankings,
        )


@dataclass(frozen=True)
class Scorer:
    """How a last stage's output becomes per-sequence stats: the output layer at the scored positions only, in
    chunks of `chunk_tokens` (the full logits never exist), on `vocab_size` real columns; `thd` says whether packed
    rows reach the attention as THD sequences (`models.gpt.packs_as_thd`); `ld_alpha` is LD-DPO's weight of the
    tokens past a pair's shorter response, for the policy and the reference alike."""

    model: ModelConfig
    chunk_tokens: int
    thd: bool
    ld_alpha: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def forward(self, batch: MicroBatch, model: torch.nn.Module) -> torch.Tensor:
        """Plain rows need only causal attention, which every core attention applies itself (no [s, s] mask: SDPA
        then runs its flash kernel). Packed rows go to THD kernels as sequence boundaries where the attention takes
        them; packed rows elsewhere and shared prompts go as blocks (`models.attention.BlockAttention`)."""
        inputs = dict(input_ids=batch.tokens, position_ids=batch.position_ids, attention_mask=None)
        if self.model.is_moe:  # Megatron's routers leave padding out of their load-balancing losses
            inputs["padding_mask"] = batch.token_weights == 0
        if batch.cu_seqlens is not None and self.thd:
            inputs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=batch.cu_seqlens,
                cu_seqlens_kv=batch.cu_seqlens,
                max_seqlen_q=batch.max_seqlen,
                max_seqlen_kv=batch.max_seqlen,
            )
        elif batch.blocks is not None:
            length = batch.tokens.shape[1]  # covers every position id: Megatron sizes its rotary table by it
            inputs["packed_seq_params"] = BlockAttention(
                qkv_format="sbhd", max_seqlen_q=length, max_seqlen_kv=length, blocks=batch.blocks
            )
        return model(**inputs)

    def stats(
        self, batch: MicroBatch, model: torch.nn.Module, hidden: torch.Tensor, square_mass: bool = False
    ) -> SequenceStats:
        """`square_mass`: also WPO's per-sequence sums (the policy's pass with `dpo.use_weighting`)."""
        weight = getattr(model, "module", model).output_weight()
        return sequence_stats(hidden, batch, weight, self.vocab_size, self.chunk_tokens, self.ld_alpha, square_mass)


def _logps_only(batch: MicroBatch, scorer: Scorer, model: torch.nn.Module, output: torch.Tensor):
    stats = scorer.stats(batch, model, output)
    zero = output.new_zeros(())
    return zero, torch.zeros((), dtype=torch.int, device=output.device), {"logps": stats.logps.detach()}


def _dpo_loss(
    batch: MicroBatch,
    ref: torch.Tensor | None,
    objective: DPOObjective,
    scorer: Scorer,
    model: torch.nn.Module,
    output: torch.Tensor,
):
    """The objective on one micro-batch's sequence stats and its reference log-probs `ref` ([2m]; None: reference-
    free, where the loss reads zeros)."""
    stats = scorer.stats(batch, model, output, square_mass=objective.dpo.use_weighting)
    m = batch.num_pairs
    ref_chosen, ref_rejected = (ref[:m], ref[m:]) if ref is not None else (None, None)
    lengths = stats.num_tokens.to(stats.logps.dtype)
    wpo = stats.wpo_logps
    weights = wpo_weights(wpo[:m], wpo[m:], lengths[:m], lengths[m:]) if wpo is not None else None
    losses = objective(
        stats.logps[:m],
        stats.logps[m:],
        ref_chosen,
        ref_rejected,
        lengths[:m],
        lengths[m:],
        sft_chosen=stats.plain_logps[:m],
        pair_weights=weights,
        rankings=batch.pair_rankings,
    )
    loss, sums = losses.losses.sum(), pair_sums(losses, stats, batch)
    aux = objective.experts.pair_term(model) if objective.experts is not None else None
    if aux is not None:  # a load-balancing loss per pair, added as TRL adds it (logged as aux_loss, inside loss)
        term, per_pair = aux
        loss, sums = loss + term, sums.add(loss=term.detach(), aux_loss=per_pair.detach())
    sums = sums.add(**turn_sums(losses, batch, objective.turns))
    # finalize_model_grads sums the pair count over DP x CP: the CP ranks' copies of the loss count their pairs once.
    count = m if parallel_state.get_context_parallel_rank() == 0 else 0
    # pair_ids let a non-finite loss be traced to its examples.
    count = torch.tensor(count, dtype=torch.int, device=output.device)
    return loss, count, {"sums": sums, "pair_ids": batch.pair_ids}


def logps_forward_step(scorer: Scorer, data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
    """A forward-only pass's step: each micro-batch's per-sequence log-probs (a reference's)."""
    batch = next(data_iterator)
    return scorer.forward(batch, model), partial(_logps_only, batch, scorer, model)


def dpo_forward_step(
    objective: DPOObjective,
    scorer: Scorer,
    data_iterator: Iterator[tuple[MicroBatch, torch.Tensor | None]],
    model: torch.nn.Module,
):
    """The policy's step: each micro-batch with its reference log-probs, through the objective. An expert group's
    `echo` (a forward-only pass's repeat that keeps its ranks' all-to-alls in step) runs the model and nothing
    more: it never reaches the loss."""
    batch, ref = next(data_iterator)
    if objective.experts is not None:
        objective.experts.before_forward(batch, model)
    output = scorer.forward(batch, model)
    return output, partial(_echo_result if batch.echo else _dpo_loss, batch, ref, objective, scorer, model)


def _echo_result(batch: MicroBatch, ref, objective: DPOObjective, scorer: Scorer, model, output: torch.Tensor):
    """An echo's loss-function result: nothing counted (no pairs, no metric sums)."""
    zero = output.new_zeros(())
    return zero, torch.zeros((), dtype=torch.int, device=output.device), {"echo": True}


def interleave_group(microbatches: int, pp: int) -> int:
    """Megatron's interleaved schedule runs each chunk over groups of g micro-batches, g in [PP, M], with a last
    partial group of none or at least PP: the smallest such g (PP itself, its default, when PP divides M). Packed
    steps have as many micro-batches as packs, so g is chosen per call."""
    for group in range(pp, microbatches + 1):
        rest = microbatches % group
        if rest == 0 or rest >= pp:
            return group
    raise MdpoError(
        f"{microbatches} micro-batches on this rank, fewer than the {pp} pipeline stages the interleaved schedule "
        "(parallel.vpp > 1) needs: give each data-parallel rank at least PP pairs"
    )


def run_schedule(
    forward_step,
    microbatches: list[MicroBatch],
    chunks: list,
    *,
    forward_only: bool,
    references: list[torch.Tensor | None] | None = None,
) -> list[dict]:
    """One pass of Megatron's (pipeline) schedule over this rank's micro-batches: 1F1B for one model chunk, the
    interleaved 1F1B for several (each chunk reading the same micro-batches in order). With `references` (one per
    micro-batch) the forward step reads (micro-batch, reference log-probs) pairs."""
    longest = max(mb.tokens.shape[1] for mb in microbatches)
    if len(chunks) > 1:
        rows = max(mb.tokens.shape[0] for mb in microbatches)  # one activation shape for the whole call
        microbatches = [in_frame(mb, rows, longest) for mb in microbatches]
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        get_model_config(chunks[0]).microbatch_group_size_per_vp_stage = interleave_group(len(microbatches), pp)
    items = microbatches if references is None else list(zip(microbatches, references, strict=True))
    data = [iter(items) for _ in chunks] if len(chunks) > 1 else iter(items)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=longest * parallel_state.get_context_parallel_world_size(),  # the interleaved schedule's shape
        micro_batch_size=max(mb.tokens.shape[0] for mb in microbatches),
        forward_only=forward_only,
    )


def forward_logps(microbatches: list[MicroBatch], chunks: list, scorer: Scorer) -> list[torch.Tensor | None]:
    """Forward-only pass of frozen model chunks (a reference): each micro-batch's per-sequence log-probs on the last
    pipeline stage, None on the others."""
    with torch.no_grad():
        outputs = run_schedule(partial(logps_forward_step, scorer), microbatches, chunks, forward_only=True)
    found = [out["logps"] for out in outputs]
    return found if found else [None] * len(microbatches)
