"""What every entry point does first: quiet the libraries' expected notices and, on CPU, patch Megatron-Core."""

from __future__ import annotations

import logging
import os
import warnings

from mdpo import megatron_cpu

# megatron-core 0.19's log notices about the APIs mdpo builds on by choice: GPTModel (its successor HybridModel
# is not in 0.16.1) and dist_checkpointing's own save strategy (NVRx, the one it suggests, is another package).
_MEGATRON_NOTICES = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}


class _DropNotice(logging.Filter):
    """Drops one logger's records that start with `notice`."""

    def __init__(self, notice: str) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.notice)


def quiet_libraries() -> None:
    """The libraries' run-time notices that say nothing to a user (their import-time ones: mdpo/__init__.py)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_modules.*")  # megatron-core 0.19
    for name, notice in _MEGATRON_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(notice))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare() -> None:
    """Once per process, before any model is built (the CLI, and each process a converter spawns)."""
    quiet_libraries()
    megatron_cpu.apply()
