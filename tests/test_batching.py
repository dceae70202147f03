"""Batching: collation of pairs into micro-batches, and the layout-independent sampler."""

from __future__ import annotations

import pytest
import torch

from mdpo.data.batching import (
    PairSampler,
    collate,
    collate_packed,
    context_parallel_share,
    packed_attention_mask,
    rank_share,
)
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError


def test_collate_masks_exactly_the_response_labels():
    pairs = [TokenizedPair(0, [1, 2, 3], [4, 5], [6]), TokenizedPair(1, [7], [8, 9, 10], [11, 12])]
    batch = collate(pairs, pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    # labels are the next tokens; the mask selects labels that are response tokens (EOS included upstream)
    picked = [batch.labels[i][batch.loss_mask[i].bool()].tolist() for i in range(4)]
    assert picked == [[4, 5], [8, 9, 10], [6], [11, 12]]
    assert batch.num_input_tokens == 5 + 4 + 4 + 3 and batch.cu_seqlens is None  # plain causal attention


def test_packed_mask_and_boundaries():
    """Two pairs in one row: each position sees the earlier positions of its own sequence only."""
    pairs = [TokenizedPair(0, [1, 2], [3], [4, 5]), TokenizedPair(1, [6], [7], [8])]
    batch = collate_packed(pairs, pad_id=0, budget=16)
    # order: pair 0 chosen, pair 0 rejected, pair 1 chosen, pair 1 rejected
    assert batch.tokens.tolist() == [[1, 2, 3, 1, 2, 4, 5, 6, 7, 6, 8]]
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 9, 11]
    allowed = ~packed_attention_mask(batch.segment_ids)[0, 0]
    lengths = [3, 4, 2, 2]
    blocks = torch.block_diag(*(torch.ones(n, n, dtype=torch.bool).tril() for n in lengths))
    assert torch.equal(allowed, blocks)


def test_sampler_is_layout_independent_and_reshuffles_per_epoch():
    sampler = PairSampler(num_pairs=20, global_batch_size=8, seed=3)
    assert sampler.steps_per_epoch == 2
    step0 = sampler.global_batch(0)
    assert step0 == PairSampler(20, 8, 3).global_batch(0)
    assert sampler.global_batch(2) != step0  # epoch 2 has its own order
    by_dp = [i for r in range(2) for i in rank_share(step0, r, 2)]
    by_mb = rank_share(step0, 0, 1)
    assert sorted(by_dp) == sorted(by_mb) == sorted(step0)
    assert len(set(torch.tensor(sampler.global_batch(0) + sampler.global_batch(1)).tolist())) == 16


def test_too_few_pairs_for_a_batch():
    with pytest.raises(DataError, match="global_batch_size=8"):
        PairSampler(num_pairs=5, global_batch_size=8, seed=0)


def test_sequence_parallel_padding_keeps_every_real_token_and_label():
    """Rounded up to a multiple of the TP size (sequence parallelism), a micro-batch has the same tokens, labels and
    loss mask in its real positions, and the padding is outside the loss."""
    from mdpo.data.batching import collate_packed

    pairs = [TokenizedPair(0, [5, 6, 7], [8, 9], [10]), TokenizedPair(1, [11], [12, 13, 14], [15])]  # 15 tokens
    for build in (lambda m: collate(pairs, pad_id=0, multiple=m), lambda m: collate_packed(pairs, 0, 64, multiple=m)):
        plain, padded = build(1), build(4)
        length = plain.tokens.shape[1]
        assert padded.tokens.shape[1] % 4 == 0 and padded.tokens.shape[1] > length
        for name in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
            assert torch.equal(getattr(padded, name)[:, :length], getattr(plain, name)), name
        assert padded.loss_mask[:, length:].sum() == 0
        assert padded.num_input_tokens == plain.num_input_tokens
    packed = collate_packed(pairs, 0, 64, multiple=4)
    assert packed.position_ids[0, -3:].tolist() == [0, 1, 2]  # the last sequence (2 tokens), then its padding
    assert int(packed.cu_seqlens[-1]) == packed.tokens.shape[1]


def test_context_parallel_shares_are_megatrons_chunks_and_cover_each_row_once():
    """CP=2 cuts each row into 4 chunks: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2 (the layout Megatron's
    RoPE slice assumes); together they hold every position once, labels shifted before the cut."""
    pairs = [TokenizedPair(0, [1, 2, 3], [4, 5], [6]), TokenizedPair(1, [7], [8, 9, 10], [11, 12])]
    whole = collate(pairs, pad_id=0, multiple=4)  # length 8
    shares = [context_parallel_share(whole, 2, rank) for rank in range(2)]
    assert shares[0].position_ids[0].tolist() == [0, 1, 6, 7] and shares[1].position_ids[0].tolist() == [2, 3, 4, 5]
    for name in ("tokens", "labels", "loss_mask", "segment_ids"):
        rebuilt = torch.empty_like(getattr(whole, name))
        for share in shares:
            rebuilt[:, share.position_ids[0]] = getattr(share, name)
        assert torch.equal(rebuilt, getattr(whole, name)), name
    assert shares[1].num_input_tokens == whole.num_input_tokens  # metrics count the whole micro-batch
    with pytest.raises(ValueError, match="multiple of 4"):
        context_parallel_share(collate(pairs, pad_id=0), 2, 0)  # length 5
