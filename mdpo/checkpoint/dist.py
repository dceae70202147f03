"""Training checkpoints with Megatron-Core dist_checkpointing: atomic, complete-or-ignored, reshardable.

A checkpoint is a folder `step_NNNNNNN` holding the model and optimizer as sharded tensors (loadable at another
TP/PP/DP layout; of a LoRA run the adapters alone, its base named in the meta), the scheduler, the step and consumed
pairs, each rank's RNG states and the run's config (and, when TR-DPO moves the reference's weights, the reference
model under `reference.`). It is
written to `step_NNNNNNN.tmp` and renamed after every rank has finished and rank 0 has written the `COMPLETE`
marker inside it, so a crash mid-save leaves only a `.tmp` folder that is never loaded. The last `keep_last` are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from mdpo.checkpoint.files import COMPLETE, TRAINING_META
from mdpo.checkpoint.manifest import write_manifest
from mdpo.errors import MdpoError, cause
from mdpo.models.lora import checkpointed_state, load_checkpointed_state

_STEP_DIR = re.compile(r"^step_(\d{7})$")
COMPONENTS = "components"  # the meta's list of what a checkpoint holds
_OLD_REFERENCE_FLAG = "reference_weights"  # how checkpoints before that list said they hold a moving reference


def optimizer_metadata() -> dict:
    """How the distributed optimizer's state is laid out in a checkpoint: `fully_reshardable` (gathered per TP/PP
    rank on its DP rank 0), so a checkpoint resumes at any TP/PP/DP layout. With torch's Adam (Megatron's fallback
    without TE or Apex: every CPU run) megatron-core 0.16 needs two repairs on load, `_load_without_adam_steps` and
    `_restore_adam_steps`."""
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first; folders without the marker are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _rng_state() -> ShardedObject:
    """This rank's RNG states; ranks of one TP/PP position are DP (and CP) replicas of each other."""
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    return ShardedObject(
        "rng_state",
        [state],
        shape,
        (pp, tp),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _chunk_key(name: str, index: int, chunks: int) -> str:
    """Where a model chunk's state sits in the checkpoint's dict: `model` alone, `model0`, `model1`, ... with an
    interleaved pipeline (as Megatron-LM). On disk a sharded tensor is named by its own key, global layer index
    included, so either loads at any layout."""
    return name if chunks == 1 else f"{name}{index}"


def _sharded_state(states: dict[str, Any], is_loading: bool, rng: bool = True) -> dict:
    """The dist_checkpointing dict of a run's components (`states`): lists of model chunks as sharded tensors (the
    policy's, `model`, under Megatron's own names; any other, such as a reference whose weights move, with its name
    as prefix: a sharded tensor's key names it on disk), the optimizer's state over the policy's shards (a LoRA
    model's chunks: their adapters), anything else with a `state_dict` as common state; and this rank's RNG."""
    chunks = states["model"]
    models = {_chunk_key("model", i, len(chunks)): checkpointed_state(chunk) for i, chunk in enumerate(chunks)}
    out: dict[str, Any] = dict(models)
    for name, component in states.items():
        if name == "model":
            continue
        if isinstance(component, list):
            for i, chunk in enumerate(component):
                out[_chunk_key(name, i, len(component))] = chunk.sharded_state_dict(prefix=f"{name}.")
        elif hasattr(component, "sharded_state_dict"):  # the optimizer, over the policy's shards
            out[name] = component.sharded_state_dict(models, is_loading=is_loading, metadata=optimizer_metadata())
        else:
            out[name] = None if is_loading else component.state_dict()  # common state: read as saved
    if rng:
        out["rng_state"] = _rng_state()
    return out


def save_checkpoint(root: Path, step: int, states: dict[str, Any], meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it, with its components (`_sharded_state`). Returns the final folder; the meta
    records which components it holds."""
    final, tmp = step_dir(root, step), root / f"step_{step:07d}.tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    state = _sharded_state(states, is_loading=False)
    meta = {**meta, COMPONENTS: sorted(states)}
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


def _distributed_optimizers(optimizer) -> list[DistributedOptimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chained if isinstance(opt, DistributedOptimizer)]


def _ensure_optimizer_state(optimizer) -> None:
    """A distributed optimizer that has not stepped has no state tensors for a checkpoint to be loaded into;
    Megatron-LM fills them with dummy values first (replaced in place by the load), and so do we."""
    for opt in _distributed_optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _load_without_adam_steps(optimizer) -> Iterator[None]:
    """megatron-core 0.16 loads a fully_reshardable state into every tensor of a parameter's optimizer state, but
    torch's Adam keeps a `step` there that the checkpoint (rightly: it lives in the param groups) does not hold:
    the load fails on it. While loading, each parameter's state is set without its step."""
    if distrib_optimizer.HAVE_APEX_OR_TE:
        yield
        return
    replaced = []
    for opt in _distributed_optimizers(optimizer):
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states  # this instance only, for this load only
        replaced.append(opt)
    try:
        yield
    finally:
        for opt in replaced:
            del opt._set_main_param_and_optimizer_states


def _restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16's DistributedOptimizer with torch's Adam loses the step count on load: `load_state_dict`
    gives every parameter one shared `step` tensor (which torch's foreach Adam would then advance once per
    parameter each step), and a dp_reshardable load would copy the current, dummy step into it. The saved count
    survives in each param group: every parameter gets it back, in a tensor of its own, so the first update after a
    resume has the right bias correction (measured: without this, DP=2 runs resumed at step 2 differ from step 4
    on, by 1.3e-3 in the loss after 6 steps)."""
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in _distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if param in opt.optimizer.state:
                    opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def load_checkpoint(folder: Path, states: dict[str, Any], load_rng: bool = True) -> tuple[dict, set[str]]:
    """Restore the components in `states` that the checkpoint holds, in place (and, same layout only: they are per
    TP/PP rank, the RNG states); returns the meta and the names restored."""
    meta = read_meta(folder)
    states = {name: component for name, component in states.items() if name in saved_components(meta)}
    optimizer = states["optimizer"]
    _ensure_optimizer_state(optimizer)
    state = _sharded_state(states, is_loading=True, rng=load_rng)
    try:
        loaded = dist_checkpointing.load(state, str(folder))
    except (Exception, CheckpointException) as err:  # many kinds; name the folder and the cause
        raise MdpoError(f"{folder}: cannot load checkpoint ({type(err).__name__}: {cause(err)})") from None
    for name, component in states.items():
        if name == "model":
            for i, chunk in enumerate(component):
                load_checkpointed_state(chunk, loaded[_chunk_key(name, i, len(component))])
        elif isinstance(component, list):
            for i, chunk in enumerate(component):
                saved = loaded[_chunk_key(name, i, len(component))]
                chunk.load_state_dict({k.removeprefix(f"{name}."): v for k, v in saved.items()})
        elif component is optimizer:
            with torch.no_grad(), _load_without_adam_steps(optimizer):
                optimizer.load_state_dict(loaded[name])
            _restore_adam_steps(optimizer)
        else:
            component.load_state_dict(loaded[name])
    if load_rng:
        rng = loaded["rng_state"][0]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta, set(states)
