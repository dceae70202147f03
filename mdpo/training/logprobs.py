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
    """Per sequence: summed response log-prob, summed mean-over-vocab logit, and response token count."""

    logps: torch.Tensor
    logit_sums: torch.Tensor
    num_tokens: torch.Tensor


def sequence_stats(
    hidden: torch.Tensor, batch: MicroBatch, weight: torch.Tensor, vocab_size: int, chunk_tokens: int
) -> SequenceStats:
    """hidden [rows, s, h] (the final norm's output), this TP rank's output-layer rows `weight` [v/tp, h] -> stats of
    the micro-batch's 2m sequences. Each scored position (`batch.score_index`) adds log p(its label) to its sequence
    (`batch.score_sequence`); vocabulary padding never enters the softmax, so log-probs equal the unpadded (HF)
    model's. With context parallelism each rank scores the positions it holds: the sums are reduced over the CP
    group (the log-probs' gradient passes back unchanged to every rank)."""
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
    logps, logit_means = token_logps(picked, weight, batch.score_labels, vocab_size, chunk_tokens)
    num_sequences = 2 * batch.num_pairs
    per_sequence = lambda values: values.new_zeros(num_sequences).index_add(0, batch.score_sequence, values)
    sequence_logps = per_sequence(logps)
    logit_sums, num_tokens = per_sequence(logit_means), per_sequence(torch.ones_like(logit_means))
    if parallel_state.get_context_parallel_world_size() > 1:
        group = parallel_state.get_context_parallel_group()
        sequence_logps = reduce_from_tensor_model_parallel_region(sequence_logps, group)
        for total in (logit_sums, num_tokens):
            torch.distributed.all_reduce(total, group=group)
    return SequenceStats(logps=sequence_logps, logit_sums=logit_sums, num_tokens=num_tokens)
