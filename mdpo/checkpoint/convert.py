"""HF model folders <-> Megatron-Core distributed checkpoints (`mdpo convert`), and loading either into a model.

A converted checkpoint is a dist_checkpointing folder holding `{"model": GPTModel.sharded_state_dict()}` (the same
model entry as a training checkpoint, so both load the same way, at any TP/PP/DP layout), plus `mdpo_model.json`
(the model description, so training needs no hand-copied hyperparameters), the source's config.json and its
tokenizer/auxiliary files. HF -> Megatron runs one process per (TP, PP) rank of the requested layout; each builds
its stage, reads only the HF tensors that stage needs, one at a time, and keeps only its shard of each, so a process
holds its part of the model (1/(TP*PP) of it) plus one full tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import shutil
from functools import partial
from pathlib import Path

import torch

from mdpo.checkpoint.hf import HFWeights, copy_auxiliary, write_hf_folder
from mdpo.config import ModelConfig, apply_hf_config
from mdpo.errors import MdpoError
from mdpo.models import families, sharding
from mdpo.models.families import base
from mdpo.models.families.base import check_hf_state, iter_hf_to_mcore, mcore_to_hf

MODEL_FILE = "mdpo_model.json"
FORMAT = "mdpo-megatron"
TRAINING_META = "mdpo_meta.json"  # written by mdpo.checkpoint.dist for training checkpoints
# The ModelConfig fields that describe the architecture (the rest say where weights come from or how to run).
ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
               "max_position_embeddings", "qkv_bias", "position_embedding", "norm_head")  # fmt: skip


def arch_fields(model: ModelConfig) -> dict:
    return {name: getattr(model, name) for name in ARCH_FIELDS}


def stored_model_fields(source: str | os.PathLike) -> tuple[str, dict] | None:
    """(file, architecture fields) of a `mdpo convert` output or a training checkpoint; None for anything else."""
    folder = Path(source)
    if (folder / MODEL_FILE).is_file():
        file = folder / MODEL_FILE
        data = json.loads(file.read_text())
        if data.get("format") != FORMAT:
            raise MdpoError(f"{file}: not a {FORMAT} description")
        return str(file), data["model"]
    if (folder / TRAINING_META).is_file():
        file = folder / TRAINING_META
        model = json.loads(file.read_text())["config"]["model"]
        return str(file), {name: model[name] for name in ARCH_FIELDS if name in model}
    return None


def export_origin(folder: Path) -> Path | None:
    """The folder whose config.json and tokenizer files an export of a model that started from `folder` reuses:
    the HF folder itself, a converted checkpoint, or what a training checkpoint's run started from."""
    if (folder / TRAINING_META).is_file():
        init_from = json.loads((folder / TRAINING_META).read_text())["config"]["model"].get("init_from")
        return export_origin(Path(init_from)) if init_from else None
    return folder if (folder / "config.json").is_file() else None


# --------------------------------------------------------------------------- loading into a built model


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
    from megatron.core import parallel_state

    from mdpo.models.gpt import padded_vocab_size

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
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

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


# --------------------------------------------------------------------------- HF export


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


def write_hf_export(folder: Path, full_state: dict[str, torch.Tensor], model: ModelConfig, origin: Path | None):
    """A HF folder of this model's family from a full Megatron state dict (local-spec names)."""
    original = None
    if origin is not None and (origin / "config.json").is_file():
        original = json.loads((origin / "config.json").read_text())
    state = mcore_to_hf(families.get(model.family), full_state, model)
    write_hf_folder(folder, state, hf_export_config(model, original))
    if origin is not None:
        copy_auxiliary(origin, folder)


# --------------------------------------------------------------------------- the two commands


def _fresh_output(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MdpoError(f"{out}: output folder exists and is not empty")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def describe_hf(hf_dir: Path, position_embedding: str = "auto") -> ModelConfig:
    """The model description of a HF folder (its family from config.json)."""
    if not (hf_dir / "config.json").is_file():
        raise MdpoError(f"{hf_dir}: no config.json (expected a HF model folder)")
    if stored_model_fields(hf_dir) is not None:
        raise MdpoError(f"{hf_dir}: is already a Megatron checkpoint")
    model = ModelConfig(init_from=str(hf_dir), position_embedding=position_embedding)
    apply_hf_config(model)
    return model


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    kv = model.num_key_value_heads or model.num_attention_heads
    if tp < 1 or pp < 1:
        raise MdpoError(f"--tp and --pp must be >= 1, got {tp} and {pp}")
    if model.num_attention_heads % tp or kv % tp:
        raise MdpoError(
            f"--tp {tp} does not divide the attention heads ({model.num_attention_heads} query, {kv} key/value)"
        )
    if model.num_hidden_layers % pp:
        raise MdpoError(f"--pp {pp} does not divide the {model.num_hidden_layers} layers")


def _write_stage(rank: int, world: int, port: int, hf_dir: str, tmp: str, model: ModelConfig, tp: int, pp: int):
    """One (TP, PP) rank of HF -> Megatron: build the stage, stream its tensors in, save collectively."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    from megatron.core import dist_checkpointing, parallel_state

    from mdpo import megatron_cpu, parallel
    from mdpo.cli import quiet_libraries
    from mdpo.models.gpt import build_gpt_model, transformer_config

    quiet_libraries()
    megatron_cpu.apply()
    parallel.start(tp, pp)
    try:
        dtype = HFWeights(hf_dir).dtype()
        config = transformer_config(model, tp=tp, pp=pp, params_dtype=dtype, init_weights=False)
        module = build_gpt_model(
            model,
            config,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        load_hf_weights(module, Path(hf_dir), model)
        dist_checkpointing.save({"model": module.sharded_state_dict()}, tmp)
    finally:
        parallel.stop()


def _units(model: ModelConfig, padded_vocab: int) -> list[tuple[list[str], int]]:
    """The model in write order as (Megatron names, bytes per element summed) units: the embedding, each layer,
    then the final norm with the output layer."""
    shapes = base.mcore_shapes(model, padded_vocab)
    size = lambda names: sum(math.prod(shapes[n]) for n in names)
    layer = lambda i: [n for n in shapes if n.startswith(f"decoder.layers.{i}.")]
    units = [["embedding.word_embeddings.weight"]]
    units += [layer(i) for i in range(model.num_hidden_layers)]
    units.append(["decoder.final_layernorm.weight", "output_layer.weight"])
    return [(names, size(names)) for names in units]


def _plan_parts(model: ModelConfig, padded_vocab: int, element_size: int, part_bytes: int) -> list[list[str]]:
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


def _cut_layers(entry, first: int, count: int):
    """A stacked layer tensor's shard as part of a grid of `count` layers starting at layer `first`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not (isinstance(entry, ShardedTensor) and entry.prepend_axis_num):
        return entry
    return dataclasses.replace(
        entry,
        global_shape=(count, *entry.global_shape[1:]),
        global_offset=(entry.global_offset[0] - first, *entry.global_offset[1:]),
        axis_fragmentations=(count, *entry.axis_fragmentations[1:]),
    )


def _merge_part(merged, part_dir: Path, tmp: Path, k: int, first: int, num_layers: int):
    """Fold part k's DCP metadata into `merged` (None for the first): its layer chunks moved back to their layers,
    its files moved into the checkpoint and renamed."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    metadata = FileSystemReader(str(part_dir)).read_metadata()
    move = lambda offsets: torch.Size([offsets[0] + first, *offsets[1:]])
    stacked = set()
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and fqn.startswith("decoder.layers."):
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
        for extra in ("metadata.json", "common.pt"):
            (part_dir / extra).rename(tmp / extra)
        return dataclasses.replace(metadata, storage_data=storage)
    merged.storage_data.update(storage)
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn in stacked and fqn in merged.state_dict_metadata:
            merged.state_dict_metadata[fqn].chunks.extend(meta.chunks)
        else:
            merged.state_dict_metadata[fqn] = meta
    return merged


def _write_in_parts(weights: HFWeights, tmp: Path, model: ModelConfig, part_bytes: int) -> None:
    """HF -> Megatron in one process that never holds the model. The model is built on the meta device for its
    sharded state dict; consecutive layers of about `part_bytes` are filled from the HF files and saved as a dist
    checkpoint of their own, the stacked layer tensors cut to the part's layers (Megatron lays a world of one's
    shards on one grid); the parts' metadata is then merged into one checkpoint, which loads like any other."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from mdpo import megatron_cpu, parallel
    from mdpo.cli import quiet_libraries
    from mdpo.models.gpt import build_gpt_model, padded_vocab_size, transformer_config

    quiet_libraries()
    megatron_cpu.apply()
    parallel.start(1, 1)
    try:
        config = transformer_config(model, params_dtype=weights.dtype(), init_weights=False)
        config.use_cpu_initialization = True  # on a GPU machine too: the meta device below, never CUDA memory
        with torch.device("meta"):
            module = build_gpt_model(model, config)
        sharded = module.sharded_state_dict()
        padded = padded_vocab_size(model.vocab_size, 1)
        element_size = torch.empty(0, dtype=weights.dtype()).element_size()
        parts = _plan_parts(model, padded, element_size, part_bytes)
        family, merged = families.get(model.family), None
        for k, names in enumerate(parts):
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
            merged = _merge_part(merged, part_dir, tmp, k, first, model.num_hidden_layers)
            shutil.rmtree(part_dir)
        with open(tmp / ".metadata", "wb") as f:
            pickle.dump(merged, f)
    finally:
        parallel.stop()


def hf_to_megatron(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    position_embedding: str = "auto",
    part_bytes: int | None = None,
):
    """`mdpo convert hf-to-megatron`: everything is checked here before any writing starts. At 1 x 1 one process
    writes in parts of about one HF shard (`part_bytes`, default the largest shard's size); a larger layout is
    written by TP x PP processes, each holding its share of the model."""
    from mdpo.parallel import free_port

    hf_dir, out = Path(hf_dir), Path(out)
    model = describe_hf(hf_dir, position_embedding)
    check_layout(model, tp, pp)
    weights = open_hf(hf_dir, model)
    weights.dtype()  # one dtype, or an error naming the mix
    tmp = _fresh_output(out)
    world, port = tp * pp, free_port()
    args = (world, port, str(hf_dir), str(tmp), model, tp, pp)
    if world == 1:
        _write_in_parts(weights, tmp, model, part_bytes or max(p.stat().st_size for p in weights.shard_files))
    else:
        import torch.multiprocessing as mp

        try:
            mp.start_processes(_write_stage, args=args, nprocs=world, start_method="spawn")
        except mp.ProcessRaisedException as err:
            raise MdpoError(f"conversion failed: {str(err).strip().splitlines()[-1]}") from None
    description = {"format": FORMAT, "version": 1, "model": arch_fields(model), "written_layout": {"tp": tp, "pp": pp},
                   "source": str(hf_dir.resolve())}  # fmt: skip
    (tmp / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")
    shutil.copy2(hf_dir / "config.json", tmp / "config.json")
    copy_auxiliary(hf_dir, tmp)
    _finish(tmp, out)
    return out


def megatron_to_hf(ckpt: str | Path, out: str | Path) -> Path:
    """`mdpo convert megatron-to-hf`: a converted or training checkpoint -> a HF folder of the model's family, in
    the checkpoint's dtype, vocab padding stripped."""
    from megatron.core import dist_checkpointing

    from mdpo import megatron_cpu, parallel
    from mdpo.models.gpt import build_gpt_model, transformer_config

    ckpt, out = Path(ckpt), Path(out)
    if stored_model_fields(ckpt) is None:
        raise MdpoError(f"{ckpt}: not a mdpo Megatron checkpoint (no {MODEL_FILE} or {TRAINING_META})")
    model = ModelConfig(init_from=str(ckpt))
    apply_hf_config(model)
    tmp = _fresh_output(out)
    megatron_cpu.apply()
    parallel.start(1, 1)
    try:
        try:
            dtype = dist_checkpointing.load_tensors_metadata(str(ckpt))["embedding.word_embeddings.weight"].dtype
        except Exception as err:
            raise MdpoError(f"{ckpt}: cannot read the checkpoint's metadata ({err})") from None
        module = build_gpt_model(model, transformer_config(model, params_dtype=dtype, init_weights=False))
        load_megatron_weights(module, ckpt)
        # norm weights are fp32 in Megatron: everything goes back in the checkpoint's dtype (exact for bf16 -> fp32)
        full = {
            sharding.te_name_inverse(k): v.to(dtype) for k, v in module.state_dict().items() if "_extra_state" not in k
        }
        write_hf_export(tmp, full, model, export_origin(ckpt))
    finally:
        parallel.stop()
    _finish(tmp, out)
    return out
