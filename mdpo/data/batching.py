"""Global batches of pairs, split over data-parallel ranks and micro-batches: dynamic padding or packing.

A micro-batch of m pairs holds 2m sequences; sequence k < m is pair k's chosen response, sequence m + k its
rejected one, so a pair never straddles micro-batches, DP ranks or pipeline stages. With dynamic padding each
sequence is a row, right-padded to the longest (plain causal attention needs no mask); packed, all 2m sequences sit
in one row, `segment_ids` says which sequence each position belongs to and `cu_seqlens` where each starts: THD
attention kernels take the boundaries, the others the block-diagonal causal mask built from them on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mdpo.data.packing import pack_pairs, pair_lengths
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [2m, s] input ids
    labels: torch.Tensor  # [2m, s] next-token ids
    loss_mask: torch.Tensor  # [2m, s] 1 where the label is a response token
    position_ids: torch.Tensor  # [2m, s]
    segment_ids: torch.Tensor  # [rows, s] the sequence (0..2m-1) each position belongs to (0 on padding)
    pair_ids: list[int]  # dataset indices, for error messages
    num_input_tokens: int = 0  # real (non-padding) tokens of all 2m sequences
    num_slots: int = 0  # token slots this micro-batch takes: rows x padded length, or the pack budget
    cu_seqlens: torch.Tensor | None = None  # packed: int32 sequence boundaries, for THD attention kernels
    max_seqlen: int = 0  # packed: the longest sequence (THD kernels take it from the host)
    ref_logps: torch.Tensor | None = None  # [2m] reference log-probs, filled by the reference pass

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device: torch.device | str) -> MicroBatch:
        for name in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "cu_seqlens"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def collate(pairs: Sequence[TokenizedPair], pad_id: int, multiple: int = 1) -> MicroBatch:
    """Right-pad to the longest sequence in the micro-batch (rounded up to `multiple`: sequence parallelism splits
    the sequence over TP ranks); padding only ever follows real tokens, so the causal mask alone keeps it out of
    every real token's attention, and the loss mask keeps it out of the loss."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = max(len(prompt) + len(response) for prompt, response in sequences)
    length = -(-length // multiple) * multiple
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(sequences), length, dtype=torch.float32)
    for row, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        tokens[row, : len(ids)] = torch.tensor(ids)
        # label at t is token t+1: response tokens sit at labels [len(prompt)-1, len(ids)-1)
        loss_mask[row, len(prompt) - 1 : len(ids) - 1] = 1.0
    labels = torch.roll(tokens, shifts=-1, dims=1)
    labels[:, -1] = pad_id
    return MicroBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=torch.arange(length).expand(len(sequences), length).contiguous(),
        segment_ids=torch.arange(len(sequences)).unsqueeze(1).expand(len(sequences), length).contiguous(),
        pair_ids=[p.index for p in pairs],
        num_input_tokens=sum(len(prompt) + len(response) for prompt, response in sequences),
        num_slots=tokens.numel(),
    )


def context_parallel_share(batch: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """This context-parallel rank's part of a padded micro-batch (length a multiple of 2 x cp): every row cut into
    2 x cp chunks, of which the rank keeps chunks `rank` and `2cp - 1 - rank` (Megatron's layout: causal attention
    work is balanced, and its RoPE slices positions the same way). Labels were shifted before the cut, and the
    token counts stay the whole micro-batch's, for the metrics."""
    if cp == 1:
        return batch
    length = batch.tokens.shape[1]
    chunk = length // (2 * cp)
    if batch.cu_seqlens is not None or chunk * 2 * cp != length:
        raise ValueError(f"context parallelism takes padded rows of a multiple of {2 * cp} tokens, got {length}")
    early = torch.arange(rank * chunk, (rank + 1) * chunk)
    keep = torch.cat([early, length - 1 - early.flip(0)])  # chunk 2cp - 1 - rank
    names = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")
    return dataclasses.replace(batch, **{name: getattr(batch, name)[:, keep] for name in names})


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's bool mask (True = masked) for one packed row [1, s]: each position sees only the earlier positions
    of its own sequence. [1, 1, s, s], built where the segment ids are (the GPU): s x s is large for long packs."""
    row = segment_ids[0]
    same = row.unsqueeze(0) == row.unsqueeze(1)
    causal = torch.ones(row.numel(), row.numel(), dtype=torch.bool, device=row.device).tril()
    return ~(same & causal).view(1, 1, row.numel(), row.numel())


def collate_packed(pairs: Sequence[TokenizedPair], pad_id: int, budget: int, multiple: int = 1) -> MicroBatch:
    """All 2m sequences of the pairs in one row (pair by pair, chosen then rejected), each attending only to
    itself (block-diagonal causal mask) with its own position ids. RoPE depends only on relative positions inside a
    segment, so the logits equal the unpacked ones. Only when the row must be a multiple of `multiple` (sequence
    parallelism) is it padded, the padding joining the last segment outside its loss mask."""
    m = len(pairs)
    order = [x for k, p in enumerate(pairs) for x in ((k, p.prompt, p.chosen), (m + k, p.prompt, p.rejected))]
    real = sum(len(prompt) + len(response) for _, prompt, response in order)
    if real > budget:
        raise ValueError(f"pairs take {real} tokens, more than the pack budget {budget}")
    total = -(-real // multiple) * multiple
    tokens = torch.full((1, total), pad_id, dtype=torch.long)
    labels = torch.full((1, total), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(1, total, dtype=torch.float32)
    positions = torch.empty(1, total, dtype=torch.long)
    segments = torch.empty(1, total, dtype=torch.long)
    boundaries = [0]
    for segment, prompt, response in order:
        ids = torch.tensor(prompt + response)
        start, end = boundaries[-1], boundaries[-1] + len(ids)
        tokens[0, start:end] = ids
        labels[0, start : end - 1] = ids[1:]  # the last position of a segment predicts nothing
        loss_mask[0, start + len(prompt) - 1 : end - 1] = 1.0
        positions[0, start:end] = torch.arange(len(ids))
        segments[0, start:end] = segment
        boundaries.append(end)
    if total > real:  # padding: the last segment continues (its positions too), masked out of the loss
        positions[0, real:] = torch.arange(real - boundaries[-2], total - boundaries[-2])
        segments[0, real:] = order[-1][0]
        boundaries[-1] = total
    return MicroBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=positions,
        segment_ids=segments,
        pair_ids=[p.index for p in pairs],
        num_input_tokens=real,
        num_slots=max(budget, total),
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        max_seqlen=max(end - start for start, end in zip(boundaries, boundaries[1:])),
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


def pack_microbatches(pairs: Sequence[TokenizedPair], indices: Sequence[int], budget: int) -> list[list[int]]:
    """This rank's pairs (dataset indices) grouped into packs of at most `budget` tokens (first-fit decreasing)."""
    bins = pack_pairs(pair_lengths([pairs[i] for i in indices]), budget)
    return [[indices[k] for k in sorted(b)] for b in bins]
