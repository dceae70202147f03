"""The run's lines for people: printed above the progress bar, by global rank 0 only (every rank may call `log`)."""

from __future__ import annotations

import torch
from tqdm import tqdm


def log(message: str) -> None:
    """A line above the progress bar, from global rank 0 only."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        tqdm.write(f"[mdpo] {message}")
