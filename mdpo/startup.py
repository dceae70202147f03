"""What every entry point does first: quiet the libraries' expected notices and, on CPU, patch Megatron-Core."""

from __future__ import annotations

import os
import warnings

from mdpo import megatron_cpu


def quiet_libraries() -> None:
    """The libraries' run-time notices that say nothing to a user (their import-time ones: mdpo/__init__.py)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare() -> None:
    """Once per process, before any model is built (the CLI, and each process a converter spawns)."""
    quiet_libraries()
    megatron_cpu.apply()
