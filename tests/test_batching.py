"""Batching: collation of pairs into micro-batches, and the layout-independent sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, collate_as, mdpo_model, model_config, random_pairs

from mdpo.config import DataConfig, ScheduleConfig
from mdpo.config.layout import Layout
from mdpo.data.batching import (
    MicroBatch,
    PairSampler,
    collate,
    collate_packed,
    context_parallel_share,
    pack_microbatches,
    rank_share,
    ranking_units,
    split_groups,
)
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError
from mdpo.training.data import make_microbatches


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


def rankings_of(sizes: list[int], start_row: int = 0) -> list[TokenizedPair]:
    """Rankings of the given numbers of completions, one row each, as `data.rank_pairs: ranking` lays them out
    (best vs second, second vs third, ...); completion j of row r is the response [r, j]."""
    pairs = []
    for row, n in enumerate(sizes, start_row):
        for j in range(n - 1):
            pairs.append(TokenizedPair(len(pairs), [row], [row, j], [row, j + 1], row=row))
    return pairs


def test_ranking_units_follow_the_chain_of_completions():
    """A ranking is the run of one row's pairs whose chosen is the earlier one's rejected: a conversation's turns
    (other prompts), a lone pair and a ranking with a stage dropped (a broken chain) are rankings of their own."""
    pairs = rankings_of([4, 2, 3])  # 3 + 1 + 2 pairs
    assert ranking_units(pairs) == [0, 0, 0, 1, 2, 2]
    broken = pairs[:1] + pairs[2:3]  # row 0 without its second stage: [0,0]>[0,1] and [0,2]>[0,3]
    assert ranking_units(broken) == [0, 1]
    turns = [
        TokenizedPair(0, [5], [5, 1], [5, 2], row=9),
        TokenizedPair(1, [5, 5, 1, 6], [5, 2], [5, 3], row=9, turn=1),
    ]
    assert ranking_units(turns) == [0, 1]


def test_whole_rankings_are_never_cut():
    """With plackett_luce's units no global batch, DP share, micro-batch, split or pack cuts a ranking; a step still
    holds about global_batch_size pairs and an epoch as many steps; one-pair rankings change nothing."""
    pairs = rankings_of([4, 2, 3, 5, 2, 2, 4, 3, 2, 5])  # 22 pairs of 10 rankings (of 1 to 4 pairs)
    units = ranking_units(pairs)
    rows = [p.row for p in pairs]
    sampler = PairSampler(rows, global_batch_size=8, seed=5, units=units, shares=2)
    whole = lambda indices: {units[i] for i in indices}
    cut = lambda parts: [u for u in set().union(*map(whole, parts)) if sum(u in whole(p) for p in parts) > 1]
    assert sampler.steps_per_epoch == 2
    for epoch in range(3):
        steps = [sampler.global_batch(2 * epoch + k) for k in range(2)]
        assert not cut(steps) and all(5 <= len(s) <= 8 + 3 for s in steps), steps
        for step in steps:
            shares = [rank_share(step, r, 2, [units[i] for i in step]) for r in range(2)]
            assert not cut(shares) and sum(shares, []) == step and all(shares)
            for mbs, at_least in ((1, 0), (3, 0), (3, len(step))):
                batches = make_microbatches(
                    DataConfig(max_length=32),
                    ScheduleConfig(micro_batch_size=mbs, global_batch_size=24),
                    Layout(),
                    pairs,
                    step,
                    pad_id=0,
                    at_least=at_least,
                    whole_rankings=True,
                )
                groups = [mb.pair_ids for mb in batches]
                assert not cut(groups) and sum(groups, []) == step
                assert all(len(g) < mbs + 4 for g in groups)  # past mbs by less than the longest ranking (4 pairs)
                if at_least:
                    assert len(groups) == len(whole(step))  # split down to single rankings, never below
                for mb in batches:  # each micro-batch numbers its own rankings
                    assert mb.pair_rankings.tolist() == ranking_units([pairs[i] for i in mb.pair_ids])
    packs = pack_microbatches(pairs, list(range(22)), budget=24, whole_rankings=True)
    assert not cut(packs) and sorted(sum(packs, [])) == list(range(22))
    with pytest.raises(DataError, match=r"pair 6's ranking \(4 pairs\) takes 24 tokens, more than a pack"):
        pack_microbatches(pairs, list(range(22)), budget=23, whole_rankings=True)
    assert split_groups([[0, 1, 2, 3, 4, 5]], 3, lambda g: [units[i] for i in g]) == [[0, 1, 2], [3], [4, 5]]
    longer = rankings_of([6, 2, 4])
    with pytest.raises(DataError, match=r"pair 0's ranking has 5 pairs, more than .* \(.* = 4\)"):
        PairSampler([p.row for p in longer], global_batch_size=8, seed=5, units=ranking_units(longer), shares=2)
    singles = PairSampler(range(20), 8, 3, units=list(range(20)), shares=2)
    assert singles.global_batch(1) == PairSampler(range(20), 8, 3).global_batch(1)
