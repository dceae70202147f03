"""HF -> Megatron in one process that never holds the model: consecutive layers of about one HF shard are filled
and saved as a dist checkpoint of their own, then the parts' torch DCP metadata is merged into one checkpoint.

Megatron lays a world of one's shards on one grid, so each part's stacked layer tensors are cut to its own layers
before saving; merging moves their chunks back to their layers, renames the parts' files and concatenates the
storage index. This edits torch.distributed.checkpoint's `Metadata` (its `state_dict_metadata` of
`TensorStorageMetadata` with `ChunkStorageMetadata` chunks, and `storage_data` keyed by `MetadataIndex`) by hand:
`tests/test_convert.py` pins those structures to the torch versions it was checked with.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import shutil
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata

from mdpo import parallel
from mdpo.checkpoint.hf import HFWeights
from mdpo.config import Layout, ModelConfig, padded_vocab_size
from mdpo.models import families
from mdpo.models.families import base
from mdpo.models.families.base import iter_hf_to_mcore
from mdpo.models.gpt import build_gpt_model, transformer_config

# torch versions whose DCP metadata layout the merge was checked against (tests/test_convert.py)
CHECKED_TORCH = ("2.11", "2.13")


def _units(model: ModelConfig, padded_vocab: int) -> list[tuple[list[str], int]]:
    """The model in write order as (Megatron names, elements) units: the embedding, each layer, then the final norm
    with the output layer (if untied)."""
    shapes = base.mcore_shapes(model, padded_vocab)
    size = lambda names: sum(math.prod(shapes[n]) for n in names)
    layer = lambda i: [n for n in shapes if n.startswith(f"decoder.layers.{i}.")]
    units = [["embedding.word_embeddings.weight"]]
    units += [layer(i) for i in range(model.num_hidden_layers)]
    units.append([n for n in ("decoder.final_layernorm.weight", "output_layer.weight") if n in shapes])  # tied: no head
    return [(names, size(names)) for names in units]


def plan_parts(model: ModelConfig, padded_vocab: int, element_size: int, part_bytes: int) -> list[list[str]]:
    """Consecutive units (embedding, layers, head) grouped into parts of about `part_bytes` (at least one unit)."""
    parts: list[list[str]] = [[]]
    filled = 0
    for names, elements in _units(model, padded_vocab):
        if parts[-1] and filled + elements * element_size > part_bytes:
            parts.append([])
            filled = 0
        parts[-1] += names
        filled += elements * element_size
    return parts


def _stacked(key: str) -> bool:
    """A tensor stacked over the layers (`decoder.layers.<name>`, the layer its first axis); MoE experts are saved
    per layer (`decoder.layers.<i>.mlp.experts...`, the expert their first axis)."""
    return key.startswith("decoder.layers.") and not key.split(".")[2].isdigit()


def _cut_layers(entry: object, first: int, count: int) -> object:
    """A stacked layer tensor's shard as part of a grid of `count` layers starting at layer `first`."""
    if not (isinstance(entry, ShardedTensor) and entry.prepend_axis_num and _stacked(entry.key)):
        return entry
    return dataclasses.replace(
        entry,
        global_shape=(count, *entry.global_shape[1:]),
        global_offset=(entry.global_offset[0] - first, *entry.global_offset[1:]),
        axis_fragmentations=(count, *entry.axis_fragmentations[1:]),
    )


def merge_part(merged: Metadata | None, part_dir: Path, tmp: Path, k: int, first: int, num_layers: int) -> Metadata:
    """Fold part k's DCP metadata into `merged` (None for the first): its layer chunks moved back to their layers,
    its files moved into the checkpoint folder `tmp` and renamed."""
    metadata = FileSystemReader(str(part_dir)).read_metadata()
    move = lambda offsets: torch.Size([offsets[0] + first, *offsets[1:]])
    stacked = set()
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and _stacked(fqn):
            stacked.add(fqn)
            meta.size = torch.Size([num_layers, *meta.size[1:]])
            meta.chunks = [ChunkStorageMetadata(move(c.offsets), c.sizes) for c in meta.chunks]
    renamed = {}
    for file in part_dir.glob("*.distcp"):
        renamed[file.name] = f"part{k}{file.name}"
        file.rename(tmp / renamed[file.name])
    storage = {
        (MetadataIndex(i.fqn, move(i.offset)) if i.fqn in stacked else i): dataclasses.replace(
            info, relative_path=renamed[info.relative_path]
        )
        for i, info in metadata.storage_data.items()
    }
    if merged is None:
        for extra in ("metadata.json", "common.pt"):  # common.pt: megatron-core 0.16 writes it even empty, 0.19 not
            if (part_dir / extra).exists():
                (part_dir / extra).rename(tmp / extra)
        return dataclasses.replace(metadata, storage_data=storage)
    merged.storage_data.update(storage)
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn in stacked and fqn in merged.state_dict_metadata:
            merged.state_dict_metadata[fqn].chunks.extend(meta.chunks)
        else:
            merged.state_dict_metadata[fqn] = meta
    return merged


def write_in_parts(weights: HFWeights, tmp: Path, model: ModelConfig, part_bytes: int) -> None:
    """The model built on the meta device for its sharded state dict; each part filled from the HF files, saved,
    merged and deleted, so the process holds one part at a time."""
    parallel.start(Layout())
    try:
        config = transformer_config(model, params_dtype=weights.dtype(), init_weights=False)
        config.use_cpu_initialization = True  # on a GPU machine too: the meta device below, never CUDA memory
        with torch.device("meta"):
            module = build_gpt_model(model, config)
        sharded = module.sharded_state_dict()
        padded = padded_vocab_size(model.vocab_size, 1)
        element_size = torch.empty(0, dtype=weights.dtype()).element_size()
        family, merged = families.get(model.family), None
        for k, names in enumerate(plan_parts(model, padded, element_size, part_bytes)):
            wanted = set(names)
            prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in names)  # their modules' _extra_state entries too
            sub = {key: copy.copy(entry) for key, entry in sharded.items() if key in wanted or key.startswith(prefixes)}
            for key, tensor in iter_hf_to_mcore(family, weights, model, padded, wanted.__contains__):
                # Megatron keeps norm weights in fp32 whatever the params dtype: match what the model would hold
                sub[key].data = tensor.to(getattr(sub[key], "dtype", None) or tensor.dtype)
            apply_factories(sub)
            layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")})
            first = layers[0] if layers else 0
            dict_list_map_inplace(partial(_cut_layers, first=first, count=len(layers)), sub)
            part_dir = tmp / f"part{k}"
            part_dir.mkdir()
            dist_checkpointing.save({"model": sub}, str(part_dir), validate_access_integrity=False)
            del sub
            merged = merge_part(merged, part_dir, tmp, k, first, model.num_hidden_layers)
            shutil.rmtree(part_dir)
        with open(tmp / ".metadata", "wb") as f:
            pickle.dump(merged, f)
    finally:
        parallel.stop()
