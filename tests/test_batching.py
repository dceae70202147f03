"""Batching: collation of pairs into micro-batches, and the layout-independent sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, collate_as, mdpo_model, model_config, random_pairs

from mdpo.data.batching import (
    MicroBatch,
    PairSampler,
    collate,
    collate_packed,
    context_parallel_share,
    rank_share,
)
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError


def scored(batch: MicroBatch) -> list[list[tuple[int, int]]]:
    """Per sequence: the (flat position, label) pairs it scores, in position order."""
    out = [[] for _ in range(2 * batch.num_pairs)]
    for index, label, sequence in zip(
        batch.score_index.tolist(), batch.score_labels.tolist(), batch.score_sequence.tolist()
    ):
        out[sequence].append((index, label))
    return [sorted(x) for x in out]


def test_collate_scores_exactly_the_response_tokens():
    pairs = [TokenizedPair(0, [1, 2, 3], [4, 5], [6]), TokenizedPair(1, [7], [8, 9, 10], [11, 12])]
    batch = collate(pairs, pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    # position t scores token t+1: each response token from the position before it (EOS included upstream)
    assert scored(batch) == [[(2, 4), (3, 5)], [(5, 8), (6, 9), (7, 10)], [(12, 6)], [(15, 11), (16, 12)]]
    assert batch.num_input_tokens == 5 + 4 + 4 + 3 and batch.cu_seqlens is None  # plain causal attention
    assert batch.blocks is None


def test_packed_blocks_and_boundaries():
    """Two pairs in one row: each sequence is one block, attending only to itself (no [t, t] mask anywhere)."""
    pairs = [TokenizedPair(0, [1, 2], [3], [4, 5]), TokenizedPair(1, [6], [7], [8])]
    batch = collate_packed(pairs, pad_id=0, budget=16)
    # order: pair 0 chosen, pair 0 rejected, pair 1 chosen, pair 1 rejected
    assert batch.tokens.tolist() == [[1, 2, 3, 1, 2, 4, 5, 6, 7, 6, 8]]
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 9, 11]
    b = batch.blocks
    lengths = [3, 4, 2, 2]
    assert b.q_lengths == b.k_lengths == tuple(lengths) and torch.equal(b.q_index, b.k_index)
    assert b.q_index.tolist() == list(range(11)) and b.cu_q.tolist() == [0, 3, 7, 9, 11]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1]]
    # sequence 0 (pair 0 chosen) scores 3 from position 1; sequence 2 (pair 0 rejected) 4, 5 from 4, 5; ...
    assert scored(batch) == [[(1, 3)], [(7, 7)], [(4, 4), (5, 5)], [(9, 8)]]


def test_sampler_is_layout_independent_and_reshuffles_per_epoch():
    sampler = PairSampler(range(20), global_batch_size=8, seed=3)
    assert sampler.steps_per_epoch == 2
    step0 = sampler.global_batch(0)
    assert step0 == PairSampler(range(20), 8, 3).global_batch(0)
    # one pair per row: the pairs' own seeded shuffle
    assert step0 == torch.randperm(20, generator=torch.Generator().manual_seed(3))[:8].tolist()
    assert sampler.global_batch(2) != step0  # epoch 2 has its own order
    by_dp = [i for r in range(2) for i in rank_share(step0, r, 2)]
    by_mb = rank_share(step0, 0, 1)
    assert sorted(by_dp) == sorted(by_mb) == sorted(step0)
    assert len(set(torch.tensor(sampler.global_batch(0) + sampler.global_batch(1)).tolist())) == 16


def test_sampler_keeps_a_rows_pairs_together():
    """Rows are shuffled, each row's pairs follow one another in their own order (a cut may fall inside a row)."""
    rows = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5]  # 12 pairs of 6 input rows
    sampler = PairSampler(rows, global_batch_size=4, seed=1)
    for epoch in range(2):
        order = [i for step in range(3) for i in sampler.global_batch(3 * epoch + step)]
        assert sorted(order) == list(range(12))
        for row in set(rows):
            where = [order.index(i) for i, r in enumerate(rows) if r == row]
            assert where == list(range(where[0], where[0] + len(where))), (row, order)
        assert [rows[i] for i in order] != sorted(rows)  # the rows themselves are shuffled


def test_too_few_pairs_for_a_batch():
    with pytest.raises(DataError, match="global_batch_size=8"):
        PairSampler(range(5), global_batch_size=8, seed=0)


def test_sequence_parallel_padding_keeps_every_real_token_and_label():
    """Rounded up to a multiple of the TP size (sequence parallelism), a micro-batch in each layout has the same
    tokens and positions in its real positions and scores the same positions: the padding is never scored."""
    from mdpo.data.batching import collate_packed, collate_shared

    pairs = [TokenizedPair(0, [5, 6, 7], [8, 9], [10]), TokenizedPair(1, [11], [12, 13, 14], [15])]  # 15 tokens
    for build in (
        lambda m: collate(pairs, pad_id=0, multiple=m),
        lambda m: collate_packed(pairs, 0, 64, multiple=m),
        lambda m: collate_shared(pairs, pad_id=0, multiple=m),
        lambda m: collate_packed(pairs, 0, 64, multiple=m, shared=True),
    ):
        plain, padded = build(1), build(4)
        length = plain.tokens.shape[1]
        assert padded.tokens.shape[1] % 4 == 0 and padded.tokens.shape[1] > length
        for name in ("tokens", "position_ids"):
            assert torch.equal(getattr(padded, name)[:, :length], getattr(plain, name)), name
        rows = lambda batch: [
            (i // batch.tokens.shape[1], i % batch.tokens.shape[1]) for i in batch.score_index.tolist()
        ]
        assert rows(padded) == rows(plain)  # the same positions scored, none in the padding
        assert torch.equal(padded.score_labels, plain.score_labels)
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
    rebuilt = torch.empty_like(whole.tokens)
    for share in shares:
        rebuilt[:, share.position_ids[0]] = share.tokens
    assert torch.equal(rebuilt, whole.tokens)
    # every score lands on exactly one rank, at the local position of the same (row, column)
    columns = lambda batch: zip(batch.score_index.tolist(), batch.score_labels.tolist(), batch.score_sequence.tolist())
    to_global = lambda share, i: (i // 4, int(share.position_ids[0, i % 4]))
    got = sorted((*to_global(share, i), label, seq) for share in shares for i, label, seq in columns(share))
    want = sorted((i // 8, i % 8, label, seq) for i, label, seq in columns(whole))
    assert got == want
    assert shares[1].num_input_tokens == whole.num_input_tokens  # metrics count the whole micro-batch
    with pytest.raises(ValueError, match="multiple of 4"):
        context_parallel_share(collate(pairs, pad_id=0), 2, 0)  # length 5


# ------------------------------------------------------------------ the interleaved pipeline's micro-batches


def test_interleave_group_is_the_smallest_group_megatrons_schedule_takes():
    """Megatron's interleaved schedule takes groups g in [PP, M] whose last partial group is empty or >= PP
    (schedules.py's two checks); fewer micro-batches than stages is one line."""
    from mdpo.errors import MdpoError
    from mdpo.training.step import interleave_group

    for pp in (2, 3, 4):
        for m in range(pp, 20):
            g = interleave_group(m, pp)
            valid = [k for k in range(pp, m + 1) if m % k == 0 or m % k >= pp]
            assert g == min(valid), (m, pp)
        assert interleave_group(4 * pp, pp) == pp  # Megatron's default when PP divides M
        with pytest.raises(MdpoError, match=f"{pp - 1} micro-batches on this rank, fewer than the {pp} pipeline"):
            interleave_group(pp - 1, pp)


def test_split_groups_halves_the_largest_until_there_are_enough():
    from mdpo.data.batching import split_groups

    assert split_groups([[1, 2, 3, 4], [5]], 4) == [[1], [2], [3, 4], [5]]
    assert split_groups([[1, 2], [3]], 2) == [[1, 2], [3]]  # enough already
    assert split_groups([[1], [2]], 4) == [[1], [2]]  # single pairs cannot be split: as many as there are pairs


@pytest.mark.parametrize("layout", ["padded", "packed", "shared", "shared_packed"])
def test_a_micro_batch_in_a_larger_frame_scores_the_same(megatron_world, layout):
    """`in_frame` (one shape per interleaved schedule call): extra rows and columns change no log-prob."""
    from conftest import tiny_hf_llama

    from mdpo.data.batching import in_frame
    from mdpo.training.step import Scorer

    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    model = mdpo_model(hf, "sdpa")
    scorer = Scorer(model_config(hf.config), chunk_tokens=7, thd=False)
    batch = collate_as(layout, random_pairs())
    rows, length = batch.tokens.shape
    framed = in_frame(batch, rows + 1, length + 5)
    assert framed.tokens.shape == (rows + 1, length + 5) and framed.num_slots >= (rows + 1) * (length + 5)
    with torch.no_grad():
        want, got = (scorer.stats(b, model, scorer.forward(b, model)).logps for b in (batch, framed))
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
