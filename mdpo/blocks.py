"""The attention-block description: which of a micro-batch's tokens attend to which (shared prompts, packed rows).
The data path builds it (`data.batching`), the core attentions read it (`models.attention`); it lives apart from
both so that neither imports the other (data knows tokens, models know no files)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Blocks:
    """Attention within sequences, over the micro-batch's flattened tokens (row-major, rows x length): block i's
    queries q_index[cu_q[i]:cu_q[i+1]] attend causally, aligned at the end (the last query sees every key), to the
    keys k_index[cu_k[i]:cu_k[i+1]]. A token in no block (padding) attends nothing. The lengths are also kept on the
    host, so a core attention can loop over blocks or call a varlen kernel without a device sync."""

    q_index: torch.Tensor  # int64 [Q]
    k_index: torch.Tensor  # int64 [K]
    cu_q: torch.Tensor  # int32 [blocks + 1]
    cu_k: torch.Tensor  # int32 [blocks + 1]
    q_positions: torch.Tensor  # int64 [Q] position ids of the queries (ALiBi's distances)
    k_positions: torch.Tensor  # int64 [K]
    q_lengths: tuple[int, ...]
    k_lengths: tuple[int, ...]

    @property
    def max_q(self) -> int:
        return max(self.q_lengths)

    @property
    def max_k(self) -> int:
        return max(self.k_lengths)

    def to(self, device: torch.device | str) -> Blocks:
        names = ("q_index", "k_index", "cu_q", "cu_k", "q_positions", "k_positions")
        return dataclasses.replace(self, **{name: getattr(self, name).to(device, non_blocking=True) for name in names})
