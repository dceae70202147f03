"""Training state as components with one interface (`Component`), so that a checkpoint saves and restores any of
them by one rule (`checkpoint.dist`): model chunks (the policy's, a moving reference's), the optimizer, anything
with a plain `state_dict` (the scheduler, the objective's running mean), and each rank's RNG states.

A component gives the entries it adds to the dist_checkpointing dict (`sharded_state`: sharded tensors and objects,
keyed on disk by their own keys, or common state stored as given) and takes back what was loaded for them
(`restore`). The optimizer's component also holds the two repairs megatron-core 0.16's distributed optimizer needs
to load with torch's Adam (Megatron's fallback without Transformer Engine or Apex: every CPU run, and a GPU run
without either): they patch one optimizer instance for one load, so they live here rather than in
`mdpo.megatron_cpu`, whose patches are process-wide and CPU-only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer, distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from mdpo.models.lora import checkpointed_state, load_checkpointed_state


class Component(Protocol):
    def sharded_state(self, is_loading: bool) -> dict[str, Any]:
        """Its entries of the dist_checkpointing dict (to save, or as templates to load into)."""

    def restore(self, loaded: dict[str, Any]) -> None:
        """Take its entries back from the loaded dict, in place."""


def chunk_key(name: str, index: int, chunks: int) -> str:
    """Where a model chunk's state sits in the checkpoint's dict: `model` alone, `model0`, `model1`, ... with an
    interleaved pipeline (as Megatron-LM). On disk a sharded tensor is named by its own key, global layer index
    included, so either loads at any layout."""
    return name if chunks == 1 else f"{name}{index}"


class ModelChunks:
    """A list of model chunks under `name` (the policy's `model`, under Megatron's own names; another's with `prefix`
    before its tensors' keys, as a moving reference's `reference.`). A LoRA model's chunks keep their adapters only
    (`models.lora.checkpointed_state`): the frozen base is named in the checkpoint's meta."""

    def __init__(self, name: str, chunks: list[torch.nn.Module], prefix: str = "") -> None:
        self.name, self.chunks, self.prefix = name, chunks, prefix

    def sharded_state(self, is_loading: bool) -> dict[str, Any]:
        count = len(self.chunks)
        return {chunk_key(self.name, i, count): checkpointed_state(c, self.prefix) for i, c in enumerate(self.chunks)}

    def restore(self, loaded: dict[str, Any]) -> None:
        for i, chunk in enumerate(self.chunks):
            saved = loaded[chunk_key(self.name, i, len(self.chunks))]
            load_checkpointed_state(chunk, {k.removeprefix(self.prefix): v for k, v in saved.items()})


def optimizer_metadata() -> dict:
    """How the distributed optimizer's state is laid out in a checkpoint: `fully_reshardable` (gathered per TP/PP
    rank on its DP rank 0), so a checkpoint resumes at any TP/PP/DP layout."""
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def _distributed_optimizers(optimizer: MegatronOptimizer) -> list[DistributedOptimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chained if isinstance(opt, DistributedOptimizer)]


class OptimizerState:
    """Megatron's optimizer over the model chunks of `model` (the policy's shards; a LoRA model's adapters)."""

    def __init__(self, name: str, optimizer: MegatronOptimizer, model: ModelChunks) -> None:
        self.name, self.optimizer, self.model = name, optimizer, model

    def sharded_state(self, is_loading: bool) -> dict[str, Any]:
        if is_loading:
            self._ensure_state()
        models = self.model.sharded_state(is_loading)
        return {self.name: self.optimizer.sharded_state_dict(models, is_loading, metadata=optimizer_metadata())}

    def restore(self, loaded: dict[str, Any]) -> None:
        with torch.no_grad(), self._load_without_adam_steps():
            self.optimizer.load_state_dict(loaded[self.name])
        self._restore_adam_steps()

    def _ensure_state(self) -> None:
        """A distributed optimizer that has not stepped has no state tensors for a checkpoint to be loaded into;
        Megatron-LM fills them with dummy values first (replaced in place by the load), and so do we."""
        for opt in _distributed_optimizers(self.optimizer):
            if len(opt.optimizer.state) == 0:
                opt._init_optimizer_states_with_dummy_values()

    @contextlib.contextmanager
    def _load_without_adam_steps(self) -> Iterator[None]:
        """megatron-core 0.16 loads a fully_reshardable state into every tensor of a parameter's optimizer state,
        but torch's Adam keeps a `step` there that the checkpoint (rightly: it lives in the param groups) does not
        hold: the load fails on it. While loading, each parameter's state is set without its step."""
        if distrib_optimizer.HAVE_APEX_OR_TE:
            yield
            return
        replaced = []
        for opt in _distributed_optimizers(self.optimizer):
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

    def _restore_adam_steps(self) -> None:
        """megatron-core 0.16's DistributedOptimizer with torch's Adam loses the step count on load:
        `load_state_dict` gives every parameter one shared `step` tensor (which torch's foreach Adam would then
        advance once per parameter each step), and a dp_reshardable load would copy the current, dummy step into it.
        The saved count survives in each param group: every parameter gets it back, in a tensor of its own, so the
        first update after a resume has the right bias correction (measured: without this, DP=2 runs resumed at
        step 2 differ from step 4 on, by 1.3e-3 in the loss after 6 steps)."""
        if distrib_optimizer.HAVE_APEX_OR_TE:
            return
        for opt in _distributed_optimizers(self.optimizer):
            for group in opt.optimizer.param_groups:
                if group.get("step") is None:
                    continue
                for param in group["params"]:
                    if param in opt.optimizer.state:
                        opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


class CommonState:
    """Anything with `state_dict` / `load_state_dict` of plain values (the scheduler, the objective's running
    mean), saved as dist_checkpointing's common state and read back as saved."""

    def __init__(self, name: str, obj: Any) -> None:
        self.name, self.obj = name, obj

    def sharded_state(self, is_loading: bool) -> dict[str, Any]:
        return {self.name: None if is_loading else self.obj.state_dict()}

    def restore(self, loaded: dict[str, Any]) -> None:
        self.obj.load_state_dict(loaded[self.name])


class RngState:
    """This rank's RNG states (CPU, CUDA, Megatron's tracker); ranks of one TP/PP position are DP (and CP) replicas
    of each other. Restored only at the layout that saved them."""

    name = "rng_state"

    def sharded_state(self, is_loading: bool) -> dict[str, Any]:
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
        replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        return {self.name: ShardedObject(self.name, [state], shape, (pp, tp), replica_id=replica)}

    def restore(self, loaded: dict[str, Any]) -> None:
        rng = loaded[self.name][0]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
