"""Cut a full Megatron state dict into one TP/PP rank's piece, and glue pieces back.

Shared by every model family: tensor names follow Megatron-Core's GPTModel (local layer spec); the Transformer
Engine spec fuses the norms into the following linear layers (a MoE layer keeps its pre-MLP norm) and keeps a MoE
layer's experts as grouped GEMMs (`linear_fc1.weight<j>`), which `te_name` translates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mdpo.config import stage_layers

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_MLA_COLUMN = re.compile(r"\.linear_(q|q_up|kv_up)_proj\.(weight|lora_B)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")

# Local-spec name -> Transformer Engine spec name (norm fused into the next linear layer).
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def tp_rule(name: str) -> tuple[int, int] | None:
    """(split dim, stride) of a tensor over TP, or None when every TP rank holds all of it.

    `linear_fc1` holds [gate; up] (and its bias): each rank takes its slice of gate and of up (stride 2); the
    row-parallel layers' biases and the router's are whole on every rank. LoRA's B of a
    column-parallel layer splits as the layer's rows, A of a row-parallel one as its input columns (`models.lora`).
    """
    if name.endswith(
        (
            "linear_qkv.weight",
            "linear_qkv.bias",
            "linear_qkv.lora_B",
            "word_embeddings.weight",
            "output_layer.weight",
            "core_attention.softmax_offset",  # attention sinks: one per head
        )
    ):
        return 0, 1
    if _MLA_COLUMN.search(name):  # MLA's up projections (its down projections are whole on every rank)
        return 0, 1
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias", "linear_fc1.lora_B")):
        return 0, 2
    if name.endswith(("linear_proj.weight", "linear_fc2.weight", "linear_proj.lora_A", "linear_fc2.lora_A")):
        return 1, 1
    return None


def shard_tensor(full: torch.Tensor, rule: tuple[int, int] | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    if rule is None or tp_size == 1:
        return full
    dim, stride = rule
    pieces = torch.chunk(full, stride * tp_size, dim=dim)
    return torch.cat([pieces[s * tp_size + tp_rank] for s in range(stride)], dim=dim)


def unshard_tensor(parts: list[torch.Tensor], rule: tuple[int, int] | None) -> torch.Tensor:
    """Inverse of `shard_tensor` over the TP ranks' parts (in rank order)."""
    if rule is None or len(parts) == 1:
        return parts[0]
    dim, stride = rule
    split = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([split[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


# A local expert's weight <-> its name in Transformer Engine's grouped experts (TEGroupedMLP)
_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.weight(\d+)$")


def te_name(name: str) -> str:
    """Local-spec name -> Transformer Engine spec name (a fused norm's name is what a dense layer calls it)."""
    expert = _LOCAL_EXPERT.match(name)
    if expert:
        return f"{expert.group(1)}{expert.group(3)}.weight{expert.group(2)}"
    match = _LAYER.match(name)
    if match and match.group(2) in _TE_NAMES:
        return f"decoder.layers.{match.group(1)}.{_TE_NAMES[match.group(2)]}"
    return name


def te_name_inverse(name: str) -> str:
    """Transformer Engine spec name -> local-spec name (identity for names the specs share)."""
    expert = _GROUPED_EXPERT.match(name)
    if expert:
        return f"{expert.group(1)}local_experts.{expert.group(3)}.{expert.group(2)}.weight"
    match = _LAYER.match(name)
    if match:
        for local, te in _TE_NAMES.items():
            if match.group(2) == te:
                return f"decoder.layers.{match.group(1)}.{local}"
    return name


def stage_local_name(
    name: str, *, num_layers: int, pp_rank: int, pp_size: int, vp_stage: int = 0, vpp: int = 1
) -> str | None:
    """A full-model tensor name as one model chunk of a pipeline stage calls it (chunk-local layer number), or
    None when the tensor lives elsewhere: the embedding on the first chunk of the first stage, the final norm and
    the head on the last chunk of the last stage."""
    match = _LAYER.match(name)
    if match:
        layers = stage_layers(num_layers, pp_rank, pp_size, vp_stage, vpp)
        index = int(match.group(1))
        return f"decoder.layers.{index - layers.start}.{match.group(2)}" if index in layers else None
    if name.startswith("embedding."):
        return name if pp_rank == 0 and vp_stage == 0 else None
    if name.startswith(("decoder.final_layernorm", "output_layer")):
        return name if pp_rank == pp_size - 1 and vp_stage == vpp - 1 else None
    return name


def is_expert(name: str) -> bool:
    """An expert's tensor: split over the expert-tensor-parallel ranks (not TP), held by one expert-parallel rank."""
    return _EXPERT.match(name) is not None


def expert_local_name(name: str, *, num_experts: int, ep_rank: int, ep_size: int) -> str | None:
    """A full-model name (global expert number) as an expert-parallel rank calls it (its local expert number), or
    None for another rank's expert; names of anything else pass unchanged. Rank r holds experts r x E/EP onwards,
    as Megatron places them."""
    match = _EXPERT.match(name)
    if match is None:
        return name
    per_rank = num_experts // ep_size
    owner, local = divmod(int(match.group(2)), per_rank)
    return f"{match.group(1)}{local}{match.group(3)}" if owner == ep_rank else None


def expert_global_name(name: str, *, ep_rank: int, per_rank: int) -> str:
    """Inverse of `expert_local_name` on an expert-parallel rank holding `per_rank` experts."""
    match = _EXPERT.match(name)
    if match is None:
        return name
    return f"{match.group(1)}{ep_rank * per_rank + int(match.group(2))}{match.group(3)}"


def merge_state_dicts(
    pieces: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]],
    *,
    num_layers: int,
    tp_size: int,
    pp_size: int,
    vpp: int = 1,
) -> dict[str, torch.Tensor]:
    """Glue {(tp_rank, pp_rank, vp_stage): a model chunk's state dict, chunk-local layer numbers} back into a full
    state dict; the tensors whole on every TP rank are read from TP rank 0's."""
    full: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        for vp_stage in range(vpp):
            offset = stage_layers(num_layers, pp_rank, pp_size, vp_stage, vpp).start
            for name in pieces[(0, pp_rank, vp_stage)]:
                match = _LAYER.match(name)
                global_name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}" if match else name
                rule = tp_rule(name)  # a tensor whole on every TP rank: TP rank 0's (the others may send none)
                parts = [pieces[(tp_rank, pp_rank, vp_stage)][name] for tp_rank in range(tp_size if rule else 1)]
                full[global_name] = unshard_tensor(parts, rule)
    return full


def load_into(module: torch.nn.Module, local: Mapping[str, torch.Tensor], *, partial: bool = False) -> None:
    """Copy a rank's tensors into a built model (either layer spec), checking names and shapes; `partial` allows
    a subset (a caller streaming tensors one at a time checks completeness itself)."""
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    te = any(k.endswith("layer_norm_weight") for k in own)
    # a MoE layer's pre-MLP norm keeps its local name under TE
    renamed = {(te_name(k) if te and te_name(k) in own else k): v for k, v in local.items()}
    missing = [] if partial else sorted(set(own) - set(renamed))
    extra = sorted(set(renamed) - set(own))
    if missing or extra:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
        raise KeyError(f"state dict does not match the model: {what}")
    for name, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"tensor '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, param in module.state_dict(keep_vars=True).items():
            if name in renamed:
                param.copy_(renamed[name])
