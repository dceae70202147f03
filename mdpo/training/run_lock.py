"""One run per run directory (and checkpoint directory): an exclusive lock held for the run's lifetime.

Global rank 0 takes a POSIX record lock (`fcntl.lockf`, which NFS v4 supports too) on `.mdpo.lock` in each folder
and writes its host and pid there; the ranks learn the outcome from it, so a second run on a busy folder stops on
every rank with one line naming the holder. The kernel drops the lock when its process dies (however it dies), so a
lock left by a dead process is simply taken over. On a file system that has no locks at all the pid in the file
decides instead: taken over when that process is gone from this host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

import torch

from mdpo.errors import MdpoError

LOCK_FILE = ".mdpo.lock"


def _holder(handle: IO[str]) -> dict:
    handle.seek(0)
    with contextlib.suppress(ValueError):
        return json.loads(handle.read() or "{}")
    return {}


def _alive_here(holder: dict) -> bool:
    """Whether the holder named in a lock file is a live process of this host (unknown hosts count as alive)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return bool(holder)
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The locks of one run; `release` (or the process's end) frees them."""

    def __init__(self) -> None:
        self._handles: list[IO[str]] = []

    def acquire(self, folder: Path, key: str) -> None:
        """Lock `folder` (created if needed) for this process, or raise naming who holds it."""
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(handle)
            if err.errno in (errno.EACCES, errno.EAGAIN) or _alive_here(holder):
                handle.close()
                who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}" if holder else "another process"
                raise MdpoError(
                    f"{key}: {folder} is in use by another mdpo run ({who}); wait for it to end or stop it "
                    "(a lock left by a process that died is taken over)"
                ) from None
            # no record locks on this file system, and the pid in the file is gone: take it over
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
        handle.flush()
        self._handles.append(handle)

    def release(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                fcntl.lockf(handle, fcntl.LOCK_UN)
            handle.close()
        self._handles = []


def lock_run(folders: dict[str, Path]) -> RunLock:
    """Collective: global rank 0 locks every folder ({config key: folder}); on any failure every rank raises the
    same one-line error, so no rank starts a run another run owns."""
    lock, error = RunLock(), None
    if torch.distributed.get_rank() == 0:
        try:
            for key, folder in folders.items():
                lock.acquire(folder, key)
        except (MdpoError, OSError) as err:
            lock.release()
            error = str(err) if isinstance(err, MdpoError) else f"cannot lock {err.filename}: {err.strerror}"
    message = [error]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise MdpoError(message[0])
    return lock
