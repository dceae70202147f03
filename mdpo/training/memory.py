"""The `peak_memory_gib` metric: CUDA memory allocated on GPU, the resident set on CPU, counted from the start of
training (loading, and on CPU the imports' transient peaks, are not part of it)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    # Linux: resets the resident set's high-water mark; elsewhere the process's lifetime peak stands (ru_maxrss)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_gib() -> float:
    """The resident set's high-water mark (VmHWM on Linux, else ru_maxrss), in GiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 2**20


def peak_memory_gib() -> float:
    """The largest peak over all ranks since the last reset. Collective: every rank calls it."""
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    else:
        peak = torch.tensor([_peak_rss_gib()])
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak)
