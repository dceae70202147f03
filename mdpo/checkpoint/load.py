"""`model.init_from` into a built pipeline stage: a HF folder streamed per tensor (this rank's shard of each), or a
Megatron checkpoint of any layout (resharded by dist_checkpointing)."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from mdpo.checkpoint.description import stored_model_fields
from mdpo.checkpoint.hf import HFWeights
from mdpo.config import ModelConfig, padded_vocab_size
from mdpo.errors import MdpoError
from mdpo.models import families, sharding
from mdpo.models.families.base import check_hf_state, iter_hf_to_mcore


def _hf_error(folder: Path, weights: HFWeights, model: ModelConfig, err: Exception) -> MdpoError:
    """A mismatch message that says when the tensors belong to another family than config.json's."""
    owner = families.owner(set(weights))
    hint = ""
    if owner is not None and owner.name != model.family:
        hint = f"; the tensors are those of a {owner.architecture} checkpoint, config.json says {model.family}"
    return MdpoError(f"{folder}: {err.args[0]}{hint}")


def open_hf(folder: Path, model: ModelConfig) -> HFWeights:
    """The folder's weights, checked (names, shapes, family) against the model before any tensor is read."""
    weights = HFWeights(folder)
    try:
        check_hf_state(families.get(model.family), weights, model)
    except (KeyError, ValueError) as err:
        raise _hf_error(folder, weights, model, err) from None
    return weights


def load_hf_weights(module: torch.nn.Module, folder: Path, model: ModelConfig) -> None:
    """Stream this rank's shard of every tensor its pipeline stage holds from a HF folder into `module`."""
    weights = open_hf(folder, model)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    local_name = lambda name: sharding.stage_local_name(
        name, num_layers=model.num_hidden_layers, pp_rank=pp_rank, pp_size=pp
    )
    family = families.get(model.family)
    loaded = 0
    for name, full in iter_hf_to_mcore(family, weights, model, padded_vocab_size(model.vocab_size, tp), local_name):
        piece = sharding.shard_tensor(full, sharding.tp_rule(name), tp_rank, tp)
        sharding.load_into(module, {local_name(name): piece}, partial=True)
        loaded += 1
    expected = sum(1 for k in module.state_dict() if not k.endswith("_extra_state"))
    if loaded != expected:
        raise MdpoError(f"{folder}: filled {loaded} of the model's {expected} tensors")


def load_megatron_weights(module: torch.nn.Module, folder: Path) -> None:
    """This rank's part of the model from a dist checkpoint written at any layout (resharded by Megatron)."""
    try:
        loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(folder))
    except (Exception, CheckpointException) as err:  # many kinds; name the folder and the cause
        cause = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
        raise MdpoError(f"{folder}: cannot load the model from this Megatron checkpoint ({cause})") from None
    module.load_state_dict(loaded["model"])


def load_initial_weights(module: torch.nn.Module, model: ModelConfig) -> None:
    """`model.init_from` into a built stage: a HF folder, a converted checkpoint or a training checkpoint."""
    folder = Path(model.init_from)
    if stored_model_fields(folder) is not None:
        load_megatron_weights(module, folder)
    else:
        load_hf_weights(module, folder, model)
