"""A model as a HF folder of its family: gathered from the TP/PP ranks, mapped back to HF names, vocab padding
stripped, with the source's config.json (when it still describes the model) and its tokenizer/auxiliary files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core import parallel_state

from mdpo.checkpoint.description import arch_fields
from mdpo.checkpoint.hf import copy_auxiliary, write_hf_folder
from mdpo.config import ModelConfig
from mdpo.models import families, sharding
from mdpo.models.families.base import mcore_to_hf


def gather_full_state(module: torch.nn.Module, model: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The whole model's tensors (local-spec names, fp32) on global rank 0, None elsewhere: each TP/PP rank of the
    DP- and CP-rank-0 replica sends its part. Collective: every rank calls it."""
    local = {k: v.detach().float().cpu() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    local = {sharding.te_name_inverse(k): v for k, v in local.items()}
    replica_zero = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    position = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    payload = (*position, local) if replica_zero else None
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(payload, gathered, dst=0)
    if gathered is None:
        return None
    pieces = {(tp, pp): sd for tp, pp, sd in (g for g in gathered if g is not None)}
    return sharding.merge_state_dicts(
        pieces,
        num_layers=model.num_hidden_layers,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )


def hf_export_config(model: ModelConfig, original: dict | None) -> dict:
    """The source's config.json when it describes this model (keeps auto_map, token ids, ...), else a fresh one."""
    family = families.get(model.family)
    if original is not None:
        fields = arch_fields(model)
        try:
            # position_embedding: Baichuan's config.json cannot say, so the user's choice never contradicts it
            same = families.detect(original) is family and all(
                fields.get(k) == v for k, v in family.read_config(original).items() if k != "position_embedding"
            )
        except ValueError:
            same = False
        if same:
            return original
    return family.write_config(model)


def write_hf_export(folder: Path, full_state: dict[str, torch.Tensor], model: ModelConfig, origin: Path | None) -> None:
    """A HF folder of this model's family from a full Megatron state dict (local-spec names)."""
    original = None
    if origin is not None and (origin / "config.json").is_file():
        original = json.loads((origin / "config.json").read_text())
    state = mcore_to_hf(families.get(model.family), full_state, model)
    write_hf_folder(folder, state, hf_export_config(model, original))
    if origin is not None:
        copy_auxiliary(origin, folder)
