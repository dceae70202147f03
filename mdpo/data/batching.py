"""Global batches of pairs, split over data-parallel ranks and micro-batches, with dynamic padding.

A micro-batch of m pairs is one forward of 2m sequences: rows [0, m) are the chosen responses and rows
[m, 2m) the rejected ones, so a pair never straddles micro-batches, DP ranks or pipeline stages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [2m, s] input ids
    labels: torch.Tensor  # [2m, s] next-token ids
    loss_mask: torch.Tensor  # [2m, s] 1 where the label is a response token
    position_ids: torch.Tensor  # [2m, s]
    attention_mask: torch.Tensor  # [1, 1, s, s] bool, True = masked (Megatron's convention)
    pair_ids: list[int]  # dataset indices, for error messages
    num_input_tokens: int = 0  # real (non-padding) tokens of all 2m sequences
    ref_logps: torch.Tensor | None = None  # [2m] reference log-probs, filled by the reference pass

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device: torch.device | str) -> MicroBatch:
        for name in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> MicroBatch:
    """Right-pad to the longest sequence in the micro-batch; padding only ever follows real tokens, so the causal
    mask alone keeps it out of every real token's attention, and the loss mask keeps it out of the loss."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = max(len(prompt) + len(response) for prompt, response in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(sequences), length, dtype=torch.float32)
    for row, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        tokens[row, : len(ids)] = torch.tensor(ids)
        # label at t is token t+1: response tokens sit at labels [len(prompt)-1, len(ids)-1)
        loss_mask[row, len(prompt) - 1 : len(ids) - 1] = 1.0
    labels = torch.roll(tokens, shifts=-1, dims=1)
    labels[:, -1] = pad_id
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return MicroBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=torch.arange(length).expand(len(sequences), length).contiguous(),
        attention_mask=causal.view(1, 1, length, length),
        pair_ids=[p.index for p in pairs],
        num_input_tokens=sum(len(prompt) + len(response) for prompt, response in sequences),
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


def rank_microbatches(indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """This DP rank's contiguous share of a global batch, as micro-batches of pair indices."""
    share = len(indices) // dp_size
    mine = list(indices[dp_rank * share : (dp_rank + 1) * share])
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def iterate_microbatches(
    pairs: Sequence[TokenizedPair], groups: Sequence[Sequence[int]], pad_id: int
) -> Iterator[MicroBatch]:
    for group in groups:
        yield collate([pairs[i] for i in group], pad_id)
