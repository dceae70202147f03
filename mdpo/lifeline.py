"""Workers end with their launcher. torchrun starts each worker in a session of its own, so a worker outlives a
launcher killed with SIGKILL (an OOM killer, `kill -9`, a node agent without cgroup cleanup) and would go on
training and writing beside a restarted run, then hang for ever at its next collective. Under torchrun a watchdog
thread kills the worker's process group (the worker and what it started, e.g. the Manager process Megatron's
checkpoint writer spawns) within half a second of the launcher's end. Only the standard library: `python -m mdpo`
starts it before importing anything heavy, so a launcher killed during start-up is noticed too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

POLL_S = 0.5
_THREAD = "mdpo-launcher"


def _is_launcher(pid: int) -> bool:
    """Whether `pid` is a torchrun launcher (for the case where it is the container's PID 1)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"torch.distributed.run" in cmdline or b"torchrun" in cmdline


def _end_process_group() -> None:
    if os.getpgid(0) == os.getpid():  # torchrun's workers lead their own group
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_S)
    _end_process_group()


def watch_launcher() -> None:
    """Start the watchdog in a torchrun worker (once); elsewhere do nothing: a nohup'd single-process run must
    outlive its shell."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or any(t.name == _THREAD for t in threading.enumerate()):
        return
    launcher = os.getppid()
    if launcher == 1 and not _is_launcher(1):  # re-parented already: the launcher died before this ran
        _end_process_group()
    threading.Thread(target=_watch, args=(launcher,), name=_THREAD, daemon=True).start()
