"""The output layer and its vocab-parallel log-softmax, in chunks of tokens, recomputed in backward.

Full fp32 logits are [tokens, vocab/TP]: 5 GB per 8192-token sequence at a 151,936-token vocabulary. Here at most
`chunk_tokens` rows of them exist at once, in forward and in backward (which recomputes each chunk's logits from
the saved hidden states and weight), so the working memory is O(chunk_tokens * vocab/TP) whatever the length.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup, ReduceOp


def _real_columns(weight: Tensor, vocab_size: int, group: ProcessGroup) -> tuple[Tensor, int]:
    """This rank's rows of the output layer that are real vocabulary, and the global id of its first row.

    Rank r holds padded-vocabulary rows r*v_local ... (r+1)*v_local-1 (ColumnParallelLinear's layout); rows at or
    past vocab_size are padding. Dropping them from the matmul excludes them from the softmax exactly as -inf
    logits would, decided on the host from the rank and shapes (no device sync).
    """
    start = torch.distributed.get_rank(group) * weight.shape[0]
    return weight[: max(0, min(weight.shape[0], vocab_size - start))], start


class _ChunkedVocabParallelLogps(torch.autograd.Function):
    """ColumnParallelLinear + Megatron's vocab-parallel cross entropy (negated), chunk by chunk over tokens.

    Forward keeps per-token statistics only. Each rank's max and sum-exp are taken against its local max and then
    combined (sum_r s_r * exp(m_r - M), M the all-reduced max): the same log-sum-exp as Megatron's, with two
    all-reduces for all tokens instead of three per chunk. With `square_mass` it also returns log sum_v p_v^2 (WPO's
    normaliser) from the same chunk's exponentials, squared. Backward recomputes softmax = exp(logits - lse).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        vocab_size: int,
        chunk_tokens: int,
        group: ProcessGroup,
        square_mass: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        real, start = _real_columns(weight, vocab_size, group)
        n, v = hidden.shape[0], real.shape[0]
        target = labels.long() - start
        in_shard = (target >= 0) & (target < v)
        target = target.masked_fill(~in_shard, 0)  # any valid column; its logit is zeroed below
        local_max = hidden.new_full((n,), float("-inf"), dtype=torch.float32)  # stays so on an all-padding rank
        # sum-exp (vs local max), target logit, logit sum, sum of squared exps (vs local max)
        sums = hidden.new_zeros((4 if square_mass else 3, n), dtype=torch.float32)
        for lo in range(0, n if v else 0, chunk_tokens):
            hi = min(lo + chunk_tokens, n)
            logits = (hidden[lo:hi] @ real.t()).float()
            sums[1, lo:hi] = logits.gather(1, target[lo:hi, None]).squeeze(1)
            sums[2, lo:hi] = logits.sum(dim=1)
            local_max[lo:hi] = logits.amax(dim=1)
            sums[0, lo:hi] = logits.sub_(local_max[lo:hi, None]).exp_().sum(dim=1)  # in place: one chunk buffer
            if square_mass:
                sums[3, lo:hi] = logits.square_().sum(dim=1)
            del logits
        sums[1].masked_fill_(~in_shard, 0.0)
        global_max = local_max.clone()
        torch.distributed.all_reduce(global_max, op=ReduceOp.MAX, group=group)
        scale = (local_max - global_max).exp_()
        sums[0].mul_(scale)
        if square_mass:
            sums[3].mul_(scale.square_())
        torch.distributed.all_reduce(sums, group=group)
        lse = global_max + sums[0].log()
        # log sum_v p_v^2 = log sum_v exp(2 (l_v - M)) - 2 (lse - M)
        log_square_mass = sums[3].log() - 2.0 * (lse - global_max) if square_mass else lse.new_zeros(0)
        ctx.save_for_backward(hidden, weight, target, in_shard, lse)
        ctx.vocab_size, ctx.chunk_tokens, ctx.group = vocab_size, chunk_tokens, group
        logit_means = sums[2] / vocab_size
        ctx.mark_non_differentiable(logit_means, log_square_mass)
        return sums[1] - lse, logit_means, log_square_mass

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Tensor, _grad_means: Tensor, _grad_square: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, target, in_shard, lse = ctx.saved_tensors
        real, _ = _real_columns(weight, ctx.vocab_size, ctx.group)
        n, v = hidden.shape[0], real.shape[0]
        grad_hidden = torch.zeros_like(hidden)  # stays so on an all-padding rank
        grad_weight = torch.zeros_like(weight)
        onehot = in_shard.float()
        for lo in range(0, n if v else 0, ctx.chunk_tokens):
            hi = min(lo + ctx.chunk_tokens, n)
            h = hidden[lo:hi]
            # d logp / d logits = onehot(target) - softmax; built in place in the recomputed chunk.
            grad_logits = (h @ real.t()).float().sub_(lse[lo:hi, None]).exp_()
            rows = torch.arange(hi - lo, device=grad_logits.device)
            grad_logits[rows, target[lo:hi]] -= onehot[lo:hi]
            grad_logits = grad_logits.mul_(-grad_logps[lo:hi, None]).to(hidden.dtype)
            grad_hidden[lo:hi] = grad_logits @ real
            grad_weight[:v].addmm_(grad_logits.t(), h)
            del grad_logits
        # Each rank's logits saw all of hidden: its full gradient is the sum over the vocab shards.
        torch.distributed.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight, None, None, None, None, None


def token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    vocab_size: int,
    chunk_tokens: int,
    group: ProcessGroup | None = None,
    square_mass: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of each label, each row's mean logit over the real vocabulary, and (`square_mass`, else empty)
    log sum_v p_v^2, the log-probability mass of the row's distribution against itself (WPO): all fp32 [n].

    hidden [n, h] (the same on every TP rank), weight [v_local, h] (this rank's vocab shard of the output layer),
    labels [n] (global ids < vocab_size). Logits are a matmul in the inputs' dtype, then fp32, as on Megatron's bf16
    path; padding columns (global id >= vocab_size) are excluded. The log-probs are differentiable: hidden's grad
    is the full one (all-reduced over `group`, default the TP group), weight's is this shard's. The means carry no
    grad and are summed over `group`; so does the square mass.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    return _ChunkedVocabParallelLogps.apply(hidden, weight, labels, vocab_size, chunk_tokens, group, square_mass)
