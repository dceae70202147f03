"""Training checkpoints with Megatron-Core dist_checkpointing: atomic, complete-or-ignored, reshardable.

A checkpoint is a folder `step_NNNNNNN` holding a run's components (`checkpoint.components`, saved and restored by
one rule): the model and optimizer as sharded tensors (loadable at another TP/PP/DP layout; of a LoRA run the
adapters alone, its base named in the meta), the scheduler and the objective as common state, each rank's RNG states
(and, when TR-DPO moves the reference's weights, the reference model under `reference.`), with the step and the
run's config in its meta. It is written to `step_NNNNNNN.tmp` and renamed after every rank has finished and rank 0
has written the `COMPLETE` marker inside it, so a crash mid-save leaves only a `.tmp` folder that is never loaded.
The last `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from mdpo.checkpoint.components import Component, RngState
from mdpo.checkpoint.files import COMPLETE, TRAINING_META
from mdpo.checkpoint.manifest import write_manifest
from mdpo.errors import MdpoError, cause

_STEP_DIR = re.compile(r"^step_(\d{7})$")
COMPONENTS = "components"  # the meta's list of what a checkpoint holds
_OLD_REFERENCE_FLAG = "reference_weights"  # how checkpoints before that list said they hold a moving reference


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first; folders without the marker are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _sharded_state(components: dict[str, Component], is_loading: bool) -> dict:
    """The dist_checkpointing dict of a run's components: each adds its own entries (`Component.sharded_state`)."""
    state: dict[str, Any] = {}
    for component in components.values():
        state.update(component.sharded_state(is_loading))
    return state


def save_checkpoint(root: Path, step: int, components: dict[str, Component], meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it, with its components (and its RNG states). Returns the final folder; the meta
    records which components it holds."""
    final, tmp = step_dir(root, step), root / f"step_{step:07d}.tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    state = _sharded_state({**components, RngState.name: RngState()}, is_loading=False)
    meta = {**meta, COMPONENTS: sorted(components)}
    try:
        dist_checkpointing.save(state, str(tmp))
        torch.distributed.barrier()
        if rank0:
            (tmp / TRAINING_META).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
            write_manifest(tmp)
            (tmp / COMPLETE).write_text("")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except (Exception, CheckpointException) as err:  # e.g. a full disk
        why = _write_error_cause(err, root)
        raise MdpoError(
            f"cannot write checkpoint {final} ({why}); it stays an unmarked .tmp folder, earlier ones are intact"
        ) from None
    torch.distributed.barrier()
    return final


# Below this much free space a failed write is taken to be a full disk (torch's zip writer reports a short write
# as "unexpected pos", without the errno).
_NEARLY_FULL_BYTES = 1 << 20


def _write_error_cause(err: BaseException, root: Path) -> str:
    """One line saying why a save failed. torch's CheckpointException is a BaseException whose message holds every
    rank's traceback: only its last line is kept."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    why = cause(err, 200)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return why
    return f"No space left on device: {free} bytes free; {why}" if free < _NEARLY_FULL_BYTES else why


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(folder: Path) -> dict:
    if not (folder / COMPLETE).is_file():
        raise MdpoError(f"{folder}: not a complete mdpo checkpoint (no {COMPLETE} marker)")
    return json.loads((folder / TRAINING_META).read_text())


def saved_common_state(folder: Path, name: str) -> Any:
    """A component's common (unsharded) state in a checkpoint (e.g. the objective's), read without the model; None
    when the checkpoint does not hold it (before that component existed: see `saved_components`)."""
    if name not in saved_components(read_meta(folder)):
        return None
    return dist_checkpointing.load_common_state_dict(str(folder)).get(name)


def saved_components(meta: dict) -> set[str]:
    """The components a checkpoint holds; before the meta listed them: the model, optimizer and scheduler, and a
    moving reference when flagged."""
    if COMPONENTS in meta:
        return set(meta[COMPONENTS])
    return {"model", "optimizer", "scheduler"} | ({"reference"} if meta.get(_OLD_REFERENCE_FLAG) else set())


def load_checkpoint(folder: Path, components: dict[str, Component], load_rng: bool = True) -> tuple[dict, set[str]]:
    """Restore the components that the checkpoint holds, in place (and, same layout only: they are per TP/PP rank,
    the RNG states); returns the meta and the names restored."""
    meta = read_meta(folder)
    held = {name: component for name, component in components.items() if name in saved_components(meta)}
    parts = {**held, **({RngState.name: RngState()} if load_rng else {})}
    state = _sharded_state(parts, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, str(folder))
    except (Exception, CheckpointException) as err:  # many kinds; name the folder and the cause
        raise MdpoError(f"{folder}: cannot load checkpoint ({type(err).__name__}: {cause(err)})") from None
    for component in parts.values():
        component.restore(loaded)
    return meta, set(held)
