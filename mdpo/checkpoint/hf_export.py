"""A model as a HF folder of its family: gathered from the TP/PP ranks, mapped back to HF names, vocab padding
stripped, with the source's config.json (when it still describes the model) and its tokenizer/auxiliary files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors.torch import save_file

from mdpo.checkpoint.description import arch_fields
from mdpo.checkpoint.hf import carried_tensors, copy_auxiliary, write_hf_folder
from mdpo.config import LoRAConfig, ModelConfig
from mdpo.models import families, sharding
from mdpo.models.families.base import adapters_to_peft, mcore_to_hf


def _rank_payload(chunks: list[torch.nn.Module], model: ModelConfig) -> tuple | None:
    """What this rank sends for the gathered model: (TP, PP rank, its chunks' dense tensors) from the DP- and
    CP-rank-0 replica, (expert-TP rank, its chunks' expert tensors with global expert numbers) from the expert
    data-parallel rank-0 replica; None where it sends neither."""
    ep_rank, ep = parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()
    per_rank = (model.num_experts or ep) // ep
    full_name = lambda name: sharding.expert_global_name(
        sharding.te_name_inverse(name), ep_rank=ep_rank, per_rank=per_rank
    )
    # copies of their own: a parameter of Megatron's DDP with the distributed optimizer is a view into its whole
    # parameter buffer, and pickling a view sends the whole buffer (measured: rank 0 past 18 GiB for a 30M MoE)
    local = [
        {
            full_name(k): v.detach().to("cpu", torch.float32, copy=True)
            for k, v in chunk.state_dict().items()
            if not k.endswith("_extra_state")
        }
        for chunk in chunks
    ]
    dense_owner = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    expert_owner = not model.is_moe or parallel_state.get_expert_data_parallel_rank() == 0
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # a dense tensor whole on every TP rank (norms, MLA's down projections) is sent by TP rank 0 alone
    sends = lambda name: not sharding.is_expert(name) and (tp_rank == 0 or sharding.tp_rule(name) is not None)
    dense = [{k: v for k, v in sd.items() if sends(k)} for sd in local] if dense_owner else None
    experts = [{k: v for k, v in sd.items() if sharding.is_expert(k)} for sd in local] if expert_owner else None
    if dense is None and experts is None:
        return None
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return tp_rank, pp_rank, dense, parallel_state.get_expert_tensor_parallel_rank(), experts


def storage_bytes(payload: object) -> int:
    """The bytes pickling a rank's payload sends for its tensors: each tensor's whole storage."""
    if isinstance(payload, torch.Tensor):
        return payload.untyped_storage().nbytes()
    if isinstance(payload, dict):
        return sum(storage_bytes(item) for item in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(storage_bytes(item) for item in payload)
    return 0


@dataclass(frozen=True)
class GatheredState:
    """A whole model on global rank 0: its tensors (local-spec names, global expert numbers, fp32) and the tensor
    bytes every rank sent for them (a bound on the export's memory: about the model's size)."""

    tensors: dict[str, torch.Tensor]
    sent_bytes: int


def gather_full_state(chunks: list[torch.nn.Module], model: ModelConfig) -> GatheredState | None:
    """The whole model on global rank 0, None elsewhere: the dense tensors from each TP/PP rank of the DP- and
    CP-rank-0 replica, the experts from each expert-TP / EP / PP rank of the expert-DP-rank-0 replica. Collective:
    every rank calls it."""
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(_rank_payload(chunks, model), gathered, dst=0)
    if gathered is None:
        return None
    dense, experts = {}, {}
    for tp, pp, dense_sds, etp, expert_sds in (g for g in gathered if g is not None):
        for vp, sd in enumerate(dense_sds or []):
            dense[(tp, pp, vp)] = sd
        for vp, sd in enumerate(expert_sds or []):
            experts.setdefault((etp, pp, vp), {}).update(sd)  # each EP rank adds its experts
    merge = lambda pieces, tp_size: sharding.merge_state_dicts(
        pieces,
        num_layers=model.num_hidden_layers,
        tp_size=tp_size,
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        vpp=len(chunks),
    )
    full = merge(dense, parallel_state.get_tensor_model_parallel_world_size())
    if model.is_moe:
        full |= merge(experts, parallel_state.get_expert_tensor_parallel_world_size())
    return GatheredState(full, storage_bytes(gathered))


def hf_export_config(model: ModelConfig, original: dict | None) -> dict:
    """The source's config.json when it describes this model (keeps auto_map, token ids, ...), else a fresh one;
    never a `quantization_config`: exports are written in the model's dtype (gpt-oss's MXFP4 experts included)."""
    if original is not None:
        original = {key: value for key, value in original.items() if key != "quantization_config"}
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
    """A HF folder of this model's family from a full Megatron state dict (local-spec names), with the tensors the
    family carries untrained from `origin` (`carried_tensors`)."""
    original = None
    if origin is not None and (origin / "config.json").is_file():
        original = json.loads((origin / "config.json").read_text())
    family = families.get(model.family)
    state = mcore_to_hf(family, full_state, model) | dict(carried_tensors(family, origin, model.num_hidden_layers))
    write_hf_folder(folder, state, hf_export_config(model, original))
    method = ((original or {}).get("quantization_config") or {}).get("quant_method")
    if method is not None:
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        print(f"export written in {dtype}, not in the source's {method} quantization (no quantization_config)")
    if origin is not None:
        copy_auxiliary(origin, folder)


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


def write_peft_adapter(
    folder: Path, adapters: dict[str, torch.Tensor], model: ModelConfig, lora: LoRAConfig, base: str | None
) -> None:
    """Full LoRA tensors (Megatron names) as a PEFT adapter folder on the family's HF modules, which
    `peft.PeftModel.from_pretrained(hf_base, folder)` loads; written to a temporary name and renamed."""
    tensors, targets = adapters_to_peft(families.get(model.family), adapters, model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base,
    }
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
        folder.rmdir()
    os.replace(tmp, folder)
