"""Per-sequence response log-probs from the final hidden states, without gathering the vocabulary or building the
full logits: the output layer is applied only at the scored positions, in chunks (`training.vocab_head`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from mdpo.data.batching import MicroBatch
from mdpo.training.vocab_head import token_logps


@dataclass
class SequenceStats:
    """Per sequence: summed response log-prob (LD-DPO's weighted sum with `ld_alpha`: what the objective compares,
    TRL's logps), the plain sum (the sft term's; the same tensor without `ld_alpha`), summed mean-over-vocab logit,
    response token count, and with `square_mass` WPO's summed log p(token) - log sum_v p_v^2 (no grad)."""

    logps: torch.Tensor
    plain_logps: torch.Tensor
    logit_sums: torch.Tensor
    num_tokens: torch.Tensor
    wpo_logps: torch.Tensor | None = None


def sequence_stats(
    hidden: torch.Tensor,
    batch: MicroBatch,
    weight: torch.Tensor,
    vocab_size: int,
    chunk_tokens: int,
    ld_alpha: float | None = None,
    square_mass: bool = False,
) -> SequenceStats:
    """hidden [rows, s, h] (the final norm's output), this TP rank's output-layer rows `weight` [v/tp, h] -> stats of
    the micro-batch's 2m sequences. Each scored position (`batch.score_index`: log p(its label), computed once) adds
    to the sequences that take it (`batch.score_take`, `batch.score_sequence`: a tree's shared response is in several
    pairs), times `ld_alpha` past the pair's shorter response (`batch.score_tail`) when given;
    vocabulary padding never enters the softmax, so log-probs equal the unpadded (HF) model's. With context
    parallelism each rank scores the positions it holds: the sums are reduced over the CP group (the log-probs'
    gradient passes back unchanged to every rank)."""
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
    logps, logit_means, square = token_logps(
        picked, weight, batch.score_labels, vocab_size, chunk_tokens, square_mass=square_mass
    )
    num_sequences = 2 * batch.num_pairs
    entries = lambda values: values.index_select(0, batch.score_take)  # each score where a sequence takes it
    per_sequence = lambda values: values.new_zeros(num_sequences).index_add(0, batch.score_sequence, values)
    plain = per_sequence(entries(logps))
    if ld_alpha is None:
        weighted = plain
    else:
        weighted = per_sequence(entries(logps) * torch.where(batch.score_tail, ld_alpha, 1.0).to(logps.dtype))
    logit_sums = per_sequence(entries(logit_means))
    num_tokens = per_sequence(torch.ones_like(batch.score_sequence, dtype=logit_means.dtype))
    wpo = per_sequence(entries(logps.detach() - square)) if square_mass else None
    if parallel_state.get_context_parallel_world_size() > 1:
        group = parallel_state.get_context_parallel_group()
        plain = reduce_from_tensor_model_parallel_region(plain, group)
        weighted = plain if ld_alpha is None else reduce_from_tensor_model_parallel_region(weighted, group)
        for total in (logit_sums, num_tokens, *((wpo,) if wpo is not None else ())):
            torch.distributed.all_reduce(total, group=group)
    return SequenceStats(logps=weighted, plain_logps=plain, logit_sums=logit_sums, num_tokens=num_tokens, wpo_logps=wpo)
