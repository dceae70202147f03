"""`model.init_from` into a built pipeline stage: a HF folder streamed per tensor (this rank's shard of each), or a
Megatron checkpoint of any layout (resharded by dist_checkpointing)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from mdpo.checkpoint.description import base_fingerprint, stored_model_fields
from mdpo.checkpoint.files import TRAINING_META
from mdpo.checkpoint.hf import HFWeights
from mdpo.config import LoRAConfig, ModelConfig, padded_vocab_size
from mdpo.errors import MdpoError, cause
from mdpo.models import families, sharding
from mdpo.models.families.base import check_hf_state, iter_hf_to_mcore
from mdpo.models.lora import (
    base_state,
    checkpointed_state,
    has_adapters,
    is_adapter,
    load_base_state,
    load_checkpointed_state,
)


def _hf_error(folder: Path, weights: HFWeights, model: ModelConfig, err: Exception) -> MdpoError:
    """A mismatch message that says when the tensors belong to another family than config.json's."""
    owners = families.owners(set(weights))
    hint = ""
    if owners and model.family not in [family.name for family in owners]:
        hint = f"; the tensors are those of a {owners[0].architecture} checkpoint, config.json says {model.family}"
    return MdpoError(f"{folder}: {err.args[0]}{hint}")


def open_hf(folder: Path, model: ModelConfig) -> HFWeights:
    """The folder's weights, checked (names, shapes, family) against the model before any tensor is read."""
    weights = HFWeights(folder)
    try:
        check_hf_state(families.get(model.family), weights, model)
    except (KeyError, ValueError) as err:
        raise _hf_error(folder, weights, model, err) from None
    return weights


def _chunk_names(module: torch.nn.Module, model: ModelConfig) -> Callable[[str], str | None]:
    """Full-model name -> the name this rank's model chunk gives it (None: held elsewhere): its pipeline stage's
    layers (its chunk `module.vp_stage` with an interleaved pipeline), its expert-parallel rank's experts."""
    pp, pp_rank = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    vp_stage = getattr(module, "vp_stage", None) or 0
    ep, ep_rank = parallel_state.get_expert_model_parallel_world_size(), parallel_state.get_expert_model_parallel_rank()

    def local_name(name: str) -> str | None:
        name = sharding.expert_local_name(name, num_experts=model.num_experts or 0, ep_rank=ep_rank, ep_size=ep)
        if name is None:
            return None
        return sharding.stage_local_name(
            name, num_layers=model.num_hidden_layers, pp_rank=pp_rank, pp_size=pp, vp_stage=vp_stage, vpp=vpp
        )

    return local_name


def load_hf_weights(module: torch.nn.Module, folder: Path, model: ModelConfig) -> None:
    """Stream this rank's shard of every tensor its model chunk holds from a HF folder into `module`: only its
    stage's layers and its expert-parallel rank's experts are read, each cut for its TP rank (experts: ETP rank)."""
    weights = open_hf(folder, model)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    local_name = _chunk_names(module, model)
    # the chunk's own tensors (local-spec names; adapters are not the HF folder's): a tied head exists only as a
    # last stage's copy under PP
    own = {
        sharding.te_name_inverse(k) for k in module.state_dict() if not k.endswith("_extra_state") and not is_adapter(k)
    }
    wanted = lambda name: local_name(name) in own
    family = families.get(model.family)
    loaded = 0
    for name, full in iter_hf_to_mcore(family, weights, model, padded_vocab_size(model.vocab_size, tp), wanted):
        rank, size = (etp_rank, etp) if sharding.is_expert(name) else (tp_rank, tp)
        piece = sharding.shard_tensor(full, sharding.tp_rule(name), rank, size)
        sharding.load_into(module, {local_name(name): piece}, partial=True)
        loaded += 1
    if loaded != len(own):
        raise MdpoError(f"{folder}: filled {loaded} of the model's {len(own)} tensors")


def lora_meta(folder: Path) -> dict | None:
    """The meta of a LoRA run's training checkpoint (which holds adapters only); None for any other folder."""
    file = Path(folder) / TRAINING_META
    if not file.is_file():
        return None
    meta = json.loads(file.read_text())
    return meta if meta["config"].get("lora", {}).get("rank", 0) > 0 else None


def check_lora_base(folder: Path, meta: dict, base: str | None) -> None:
    """A LoRA checkpoint's adapters belong to the base its run trained on: `base` (a folder) must hold that model."""
    saved, started = meta.get("lora_base"), meta["config"]["model"].get("init_from")
    if base is None or not Path(base).is_dir():
        raise MdpoError(f"{folder}: a LoRA checkpoint needs its base model, {base or started}, which is not a folder")
    now = base_fingerprint(base)
    if now != saved:
        raise MdpoError(
            f"{folder}: its adapters belong to the base model {started} (fingerprint {saved}), but {base} holds "
            f"another model (fingerprint {now}); use that base, or start a new run"
        )


def load_megatron_weights(module: torch.nn.Module, folder: Path) -> None:
    """This rank's part of the model from a dist checkpoint written at any layout (resharded by Megatron): of a
    LoRA checkpoint its adapters (into a module built with them, its base loaded already), else the base weights
    (a module built with adapters keeps its own)."""
    adapters = lora_meta(folder) is not None
    if adapters and not has_adapters(module):
        raise MdpoError(
            f"{folder}: a LoRA checkpoint holds its adapters only; export it merged with its base first "
            f"(mdpo convert megatron-to-hf --ckpt {folder} --out DIR) and use that folder"
        )
    state = checkpointed_state(module) if adapters else base_state(module)
    try:
        loaded = dist_checkpointing.load({"model": state}, str(folder))
    except (Exception, CheckpointException) as err:  # many kinds; name the folder and the cause
        raise MdpoError(f"{folder}: cannot load the model from this Megatron checkpoint ({cause(err)})") from None
    (load_checkpointed_state if adapters else load_base_state)(module, loaded["model"])


def checkpoint_lora(folder: Path) -> LoRAConfig | None:
    """The lora section of a LoRA run's checkpoint (a model to load it into is built with these adapters); None
    for any other folder."""
    meta = lora_meta(folder)
    return LoRAConfig(**meta["config"]["lora"]) if meta is not None else None


def load_lora_checkpoint(module: torch.nn.Module, folder: Path, model: ModelConfig) -> None:
    """A LoRA run's checkpoint into a stage built with its adapters (`checkpoint_lora`): the base its run started
    from (checked to be the same model), then the adapters."""
    meta = lora_meta(folder)
    base = meta["config"]["model"].get("init_from")
    check_lora_base(folder, meta, base)
    load_initial_weights(module, dataclasses.replace(model, init_from=base))
    load_megatron_weights(module, folder)


def load_initial_weights(module: torch.nn.Module, model: ModelConfig) -> None:
    """`model.init_from` into a built stage: a HF folder, a converted checkpoint or a training checkpoint."""
    folder = Path(model.init_from)
    if stored_model_fields(folder) is not None:
        load_megatron_weights(module, folder)
    else:
        load_hf_weights(module, folder, model)
