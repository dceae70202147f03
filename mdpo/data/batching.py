"""Global batches of pairs, split over data-parallel ranks and micro-batches: padded rows or packs, each pair's
prompt once (shared) or in both of its sequences.

A micro-batch of m pairs holds 2m sequences; sequence k < m is pair k's chosen response, sequence m + k its
rejected one, so a pair never straddles micro-batches, DP ranks or pipeline stages. Four layouts:

- padded: each sequence [prompt | response] is a row, right-padded to the longest; plain causal attention.
- packed: all 2m sequences in one row, each attending only to itself (`blocks`; THD kernels take `cu_seqlens`).
- shared (padded): each pair is one row [prompt | chosen | rejected]; the rejected tokens' positions continue from
  the prompt's end, as in their own sequence; chosen attends to prompt + chosen, rejected to prompt + rejected and
  never to chosen (`blocks`), and both responses' first tokens are scored from the prompt's last position.
- shared and packed: those pair rows one after another in one row.

What is scored is explicit: `score_index` (flat positions, row * length + column, whose next-token log-prob counts),
`score_labels` (the token) and `score_sequence` (which of the 2m sequences it adds to); with a shared prompt the
prompt's last position is scored twice. `score_tail` marks the response tokens past the pair's shorter response
(LD-DPO weights them by `dpo.ld_alpha`). Everything is built here, on the host, so the step needs no device sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mdpo.blocks import Blocks
from mdpo.data.packing import pack_pairs, pair_lengths
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [rows, length] input ids
    position_ids: torch.Tensor  # [rows, length]
    score_index: torch.Tensor  # [n] flat positions whose next-token log-prob is scored
    score_labels: torch.Tensor  # [n] the token scored there
    score_sequence: torch.Tensor  # [n] the sequence (0..2m-1) it adds to
    score_tail: torch.Tensor  # [n] bool: the token lies past the pair's shorter response (LD-DPO's tail)
    pair_ids: list[int]  # dataset indices, for error messages
    num_input_tokens: int = 0  # as TRL counts them: every sequence's real tokens, its prompt included
    num_computed_tokens: int = 0  # real tokens the rows hold (a shared prompt once)
    num_slots: int = 0  # token slots this micro-batch takes: rows x padded length, or the pack budget
    blocks: Blocks | None = None  # None: plain causal rows
    cu_seqlens: torch.Tensor | None = None  # packed, unshared: int32 sequence boundaries, for THD attention kernels
    max_seqlen: int = 0  # packed: the longest sequence (THD kernels take it from the host)
    # [rows, length] each position's count among the tokens TRL's batch would hold: padding 0, a shared prompt 2,
    # others 1 (sums to num_input_tokens), and the pair (0..m-1) it belongs to: MoE load balancing is per pair
    token_weights: torch.Tensor | None = None
    token_pairs: torch.Tensor | None = None
    echo: bool = False  # a repeat that only keeps an expert-parallel group's forwards in step: results not counted

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device: torch.device | str) -> MicroBatch:
        for name in (
            "tokens",
            "position_ids",
            "score_index",
            "score_labels",
            "score_sequence",
            "score_tail",
            "cu_seqlens",
            "token_weights",
            "token_pairs",
        ):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        if self.blocks is not None:
            self.blocks = self.blocks.to(device)
        return self


class _Rows:
    """Builds a micro-batch's rows: token ids, position ids, scores and attention blocks, sequence by sequence."""

    def __init__(self, rows: int, length: int, pad_id: int, pairs: int) -> None:
        self.length, self.num_pairs = length, pairs
        self.tokens = torch.full((rows, length), pad_id, dtype=torch.long)
        self.positions = torch.arange(length).repeat(rows, 1)  # padding keeps its index (CP slices RoPE by it)
        self.weights = torch.zeros(rows, length)  # see MicroBatch.token_weights
        self.pairs = torch.zeros(rows, length, dtype=torch.long)
        self.scores: list[tuple[int, int, int, bool]] = []  # (flat position, label, sequence, past the shorter)
        self.blocks: list[tuple[list[int], list[int]]] = []  # (query flat positions, key flat positions)

    def _place(self, row: int, start: int, ids: list[int], first_position: int, sequence: int) -> list[int]:
        self.tokens[row, start : start + len(ids)] = torch.tensor(ids)
        self.weights[row, start : start + len(ids)] = 1.0
        self.pairs[row, start : start + len(ids)] = sequence % self.num_pairs
        self.positions[row, start : start + len(ids)] = torch.arange(first_position, first_position + len(ids))
        base = row * self.length + start
        return list(range(base, base + len(ids)))

    def sequence(
        self, row: int, start: int, prompt: list[int], response: list[int], sequence: int, shorter: int
    ) -> int:
        """[prompt | response] at `start`: response tokens scored (those past `shorter`, the pair's shorter response
        length, marked as tail), one square causal block; returns its end."""
        ids, p = prompt + response, len(prompt)
        flat = self._place(row, start, ids, 0, sequence)
        self.scores += [(flat[p - 1 + t], token, sequence, t >= shorter) for t, token in enumerate(response)]
        self.blocks.append((flat, flat))
        return start + len(ids)

    def shared(self, row: int, start: int, pair: TokenizedPair, chosen_seq: int, rejected_seq: int) -> int:
        """[prompt | chosen | rejected] at `start`, rejected's positions continuing from the prompt's end."""
        p, c, shorter = len(pair.prompt), len(pair.chosen), _shorter(pair)
        head = self._place(row, start, pair.prompt + pair.chosen, 0, chosen_seq)
        tail = self._place(row, start + p + c, pair.rejected, p, rejected_seq)
        self.weights[row, start : start + p] = 2.0  # the prompt stands for both of its sequences
        self.scores += [(head[p - 1 + t], token, chosen_seq, t >= shorter) for t, token in enumerate(pair.chosen)]
        before_rejected = [head[p - 1], *tail[:-1]]  # the prompt's last position predicts rejected's first token
        self.scores += [
            (flat, token, rejected_seq, t >= shorter)
            for t, (flat, token) in enumerate(zip(before_rejected, pair.rejected))
        ]
        self.blocks += [(head, head), (tail, head[:p] + tail)]
        return start + p + c + len(pair.rejected)

    def batch(self, pairs: Sequence[TokenizedPair], *, with_blocks: bool, **fields: object) -> MicroBatch:
        index, labels, sequences, tails = zip(*self.scores)
        index, labels, sequences = (torch.tensor(column, dtype=torch.long) for column in (index, labels, sequences))
        blocks = None
        if with_blocks:
            queries, keys = zip(*self.blocks)
            flat_positions = self.positions.reshape(-1)
            q_index = torch.tensor([i for q in queries for i in q], dtype=torch.long)
            k_index = torch.tensor([i for k in keys for i in k], dtype=torch.long)
            offsets = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            q_lengths, k_lengths = tuple(map(len, queries)), tuple(map(len, keys))
            blocks = Blocks(
                q_index,
                k_index,
                offsets(q_lengths),
                offsets(k_lengths),
                flat_positions[q_index],
                flat_positions[k_index],
                q_lengths,
                k_lengths,
            )
        return MicroBatch(
            tokens=self.tokens,
            position_ids=self.positions,
            score_index=index,
            score_labels=labels,
            score_sequence=sequences,
            score_tail=torch.tensor(tails, dtype=torch.bool),
            pair_ids=[p.index for p in pairs],
            num_input_tokens=sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs),
            blocks=blocks,
            token_weights=self.weights,
            token_pairs=self.pairs,
            **fields,
        )


def _shorter(pair: TokenizedPair) -> int:
    return min(len(pair.chosen), len(pair.rejected))


def _rounded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def collate(pairs: Sequence[TokenizedPair], pad_id: int, multiple: int = 1) -> MicroBatch:
    """Each sequence a row, right-padded to the longest (rounded up to `multiple`: sequence parallelism splits the
    sequence over TP ranks, context parallelism into 2 x CP chunks); padding only ever follows real tokens, so the
    causal mask alone keeps it out of every real token's attention."""
    m = len(pairs)
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = _rounded(max(len(prompt) + len(response) for prompt, response in sequences), multiple)
    rows = _Rows(2 * m, length, pad_id, m)
    for k, (prompt, response) in enumerate(sequences):
        rows.sequence(k, 0, prompt, response, k, _shorter(pairs[k % m]))
    computed = sum(len(prompt) + len(response) for prompt, response in sequences)
    return rows.batch(pairs, with_blocks=False, num_computed_tokens=computed, num_slots=2 * m * length)


def collate_shared(pairs: Sequence[TokenizedPair], pad_id: int, multiple: int = 1) -> MicroBatch:
    """Each pair a row [prompt | chosen | rejected], right-padded to the longest (rounded up to `multiple`)."""
    m = len(pairs)
    length = _rounded(max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs), multiple)
    rows = _Rows(m, length, pad_id, m)
    computed = sum(rows.shared(k, 0, p, k, m + k) for k, p in enumerate(pairs))
    return rows.batch(pairs, with_blocks=True, num_computed_tokens=computed, num_slots=m * length)


def collate_packed(
    pairs: Sequence[TokenizedPair], pad_id: int, budget: int, multiple: int = 1, shared: bool = False
) -> MicroBatch:
    """All of the pairs in one row, pair by pair (chosen then rejected; or one [prompt | chosen | rejected] each when
    `shared`). Only when the row must be a multiple of `multiple` (sequence parallelism) is it padded; the padding
    attends nothing and is never scored (for THD kernels it joins the last sequence)."""
    m = len(pairs)
    real = sum(pair_lengths(pairs, shared=shared))
    if real > budget:
        raise ValueError(f"pairs take {real} tokens, more than the pack budget {budget}")
    total = _rounded(real, multiple)
    rows = _Rows(1, total, pad_id, m)
    end, boundaries = 0, [0]
    for k, pair in enumerate(pairs):
        if shared:
            end = rows.shared(0, end, pair, k, m + k)
        else:
            end = rows.sequence(0, end, pair.prompt, pair.chosen, k, _shorter(pair))
            boundaries.append(end)
            end = rows.sequence(0, end, pair.prompt, pair.rejected, m + k, _shorter(pair))
        boundaries.append(end)
    if total > real:  # the padding continues the last sequence's positions (THD kernels count it in that one)
        last = int(rows.positions[0, real - 1])
        rows.positions[0, real:] = torch.arange(last + 1, last + 1 + total - real)
    fields: dict[str, object] = {"num_computed_tokens": real, "num_slots": max(budget, total)}
    if not shared:  # THD kernels: one sequence per boundary (the padding joins the last)
        boundaries[-1] = total
        fields["cu_seqlens"] = torch.tensor(boundaries, dtype=torch.int32)
        fields["max_seqlen"] = max(b - a for a, b in zip(boundaries, boundaries[1:]))
    return rows.batch(pairs, with_blocks=True, **fields)


def context_parallel_share(batch: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """This context-parallel rank's part of a padded micro-batch (length a multiple of 2 x cp): every row cut into
    2 x cp chunks, of which the rank keeps chunks `rank` and `2cp - 1 - rank` (Megatron's layout: causal attention
    work is balanced, and its RoPE slices positions the same way). Scores stay with the positions they are taken
    at, and the token counts stay the whole micro-batch's, for the metrics."""
    if cp == 1:
        return batch
    rows, length = batch.tokens.shape
    chunk = length // (2 * cp)
    if batch.blocks is not None or chunk * 2 * cp != length:
        raise ValueError(f"context parallelism takes padded rows of a multiple of {2 * cp} tokens, got {length}")
    early = torch.arange(rank * chunk, (rank + 1) * chunk)
    keep = torch.cat([early, length - 1 - early.flip(0)])  # chunk 2cp - 1 - rank
    local = torch.full((length,), -1, dtype=torch.long)
    local[keep] = torch.arange(keep.numel())
    row, column = batch.score_index // length, batch.score_index % length
    mine = local[column] >= 0
    return dataclasses.replace(
        batch,
        tokens=batch.tokens[:, keep],
        position_ids=batch.position_ids[:, keep],
        score_index=row[mine] * keep.numel() + local[column[mine]],
        score_labels=batch.score_labels[mine],
        score_sequence=batch.score_sequence[mine],
        score_tail=batch.score_tail[mine],
        token_weights=None if batch.token_weights is None else batch.token_weights[:, keep],
        token_pairs=None if batch.token_pairs is None else batch.token_pairs[:, keep],
    )


class PairSampler:
    """Seeded per-epoch shuffle; step k's global batch is fixed by (seed, k) whatever the DP layout.

    The global batch is cut into DP-rank shares, each cut into micro-batches: the same pairs make up a
    step for any micro-batch size or DP size. A trailing partial global batch of an epoch is not used.
    """

    def __init__(self, num_pairs: int, global_batch_size: int, seed: int) -> None:
        if num_pairs < global_batch_size:
            raise DataError(
                f"{num_pairs} usable pairs are fewer than one global batch (schedule.global_batch_size="
                f"{global_batch_size})"
            )
        self.num_pairs = num_pairs
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_pairs // global_batch_size

    def global_batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = within * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()


def rank_share(indices: Sequence[int], dp_rank: int, dp_size: int) -> list[int]:
    """This DP rank's contiguous share of a global batch (pair indices); the config makes the split even."""
    share = len(indices) // dp_size
    return list(indices[dp_rank * share : (dp_rank + 1) * share])


def pack_microbatches(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], budget: int, shared: bool = False
) -> list[list[int]]:
    """This rank's pairs (dataset indices) grouped into packs of at most `budget` tokens (first-fit decreasing)."""
    bins = pack_pairs(pair_lengths([pairs[i] for i in indices], shared=shared), budget)
    return [[indices[k] for k in sorted(b)] for b in bins]


def split_groups(groups: list[list[int]], count: int) -> list[list[int]]:
    """At least `count` micro-batches when there are that many pairs (the interleaved pipeline needs one per
    stage): the group with the most pairs is halved until there are enough. Order within groups is kept."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        largest = max(range(len(groups)), key=lambda k: len(groups[k]))
        group = groups[largest]
        if len(group) < 2:
            break
        groups[largest : largest + 1] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return groups


def in_frame(batch: MicroBatch, rows: int, length: int) -> MicroBatch:
    """The micro-batch in a [rows, length] frame, padding rows and columns added at the end: the interleaved
    pipeline sends one activation shape per schedule call. Flat indices of the scores and blocks are remapped; the
    added tokens are scored nowhere and attend nothing (plain rows: only earlier padding); in a packed row they
    continue the last sequence, as `collate_packed`'s own padding does."""
    old_rows, old_length = batch.tokens.shape
    if (old_rows, old_length) == (rows, length):
        return batch
    remap = lambda flat: flat // old_length * length + flat % old_length
    tokens = batch.tokens.new_zeros(rows, length)
    tokens[:old_rows, :old_length] = batch.tokens
    positions = torch.arange(length, device=batch.tokens.device).repeat(rows, 1)
    positions[:old_rows, :old_length] = batch.position_ids
    fields: dict[str, object] = {"num_slots": max(batch.num_slots, rows * length)}
    if batch.token_weights is not None:
        weights = batch.token_weights.new_zeros(rows, length)
        weights[:old_rows, :old_length] = batch.token_weights
        fields["token_weights"] = weights
        fields["token_pairs"] = batch.token_pairs.new_zeros(rows, length)
        fields["token_pairs"][:old_rows, :old_length] = batch.token_pairs
    if batch.cu_seqlens is not None:  # one packed row: the padding joins its last sequence
        last = int(batch.position_ids[0, -1])
        positions[0, old_length:] = torch.arange(last + 1, last + 1 + length - old_length)
        cu = batch.cu_seqlens.clone()
        cu[-1] = length
        fields.update(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
    if batch.blocks is not None:
        blocks = batch.blocks
        fields["blocks"] = dataclasses.replace(blocks, q_index=remap(blocks.q_index), k_index=remap(blocks.k_index))
    return dataclasses.replace(
        batch, tokens=tokens, position_ids=positions, score_index=remap(batch.score_index), **fields
    )
