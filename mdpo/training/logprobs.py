"""Per-sequence response log-probs from vocab-parallel logits, without gathering the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


@dataclass
class SequenceStats:
    """Per sequence: summed response log-prob, summed mean-over-vocab logit, and response token count."""

    logps: torch.Tensor
    logit_sums: torch.Tensor
    num_tokens: torch.Tensor


def vocab_padding_mask(local_vocab: int, vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """True for this TP rank's logit columns that are vocab padding (ids >= vocab_size), None if there are none."""
    start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    if start + local_vocab <= vocab_size:  # decided on the host: no device sync per micro-batch
        return None
    return torch.arange(start, start + local_vocab, device=device) >= vocab_size


def sequence_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_size: int,
    segment_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> SequenceStats:
    """logits [rows, s, v/tp] (this rank's vocab shard), labels and loss_mask [rows, s] -> per-sequence stats.

    Without `segment_ids` each row is one sequence; with them (packed rows) position t adds to sequence
    segment_ids[t], of `num_sequences`. Padded vocabulary columns are set to -inf so that log-probs equal the
    unpadded (HF) model's. Megatron's vocab-parallel cross entropy works in place on its input, so the metric
    sums are taken first. With context parallelism each rank holds part of every sequence: the sums are reduced
    over the CP group (the log-probs' gradient passes back unchanged to every rank).
    """
    pad = vocab_padding_mask(logits.shape[-1], vocab_size, logits.device)
    with torch.no_grad():
        real = logits.detach().float()
        if pad is not None:
            real = real.masked_fill(pad, 0.0)
        token_logit_sum = real.sum(dim=-1)
        torch.distributed.all_reduce(token_logit_sum, group=parallel_state.get_tensor_model_parallel_group())
    # Nothing reads `logits` after this call, so its in-place work on them is harmless.
    masked = logits.masked_fill(pad, float("-inf")) if pad is not None else logits
    token_logps = -tensor_parallel.vocab_parallel_cross_entropy(masked, labels)
    mask = loss_mask.to(token_logps.dtype)
    per_token = (token_logps * mask, token_logit_sum / vocab_size * mask, mask)
    if segment_ids is None:
        logps, logit_sums, num_tokens = (t.sum(dim=-1) for t in per_token)
    else:
        index = segment_ids.reshape(-1)
        logps, logit_sums, num_tokens = (
            t.new_zeros(num_sequences).index_add(0, index, t.reshape(-1)) for t in per_token
        )
    if parallel_state.get_context_parallel_world_size() > 1:
        group = parallel_state.get_context_parallel_group()
        logps = reduce_from_tensor_model_parallel_region(logps, group)
        for total in (logit_sums, num_tokens):
            torch.distributed.all_reduce(total, group=group)
    return SequenceStats(logps=logps, logit_sums=logit_sums, num_tokens=num_tokens)
