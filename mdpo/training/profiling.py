"""`logging.profile_step`: one step under torch.profiler, written where the run's other outputs are."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def profiled(run_dir: Path, step: int, write: bool) -> Iterator[None]:
    """Profile the block; when `write` (global rank 0), RUN_DIR/profile.txt gets the ops by device time (the GPU's
    kernels when there is one) and profile_trace.json the trace (chrome://tracing or Perfetto)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        yield
    if write:
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=80)
        (run_dir / "profile.txt").write_text(f"step {step}\n{table}\n")
        profiler.export_chrome_trace(str(run_dir / "profile_trace.json"))
