"""`mdpo convert`: HF model folders <-> Megatron-Core distributed checkpoints.

A converted checkpoint is a dist_checkpointing folder holding `{"model": GPTModel.sharded_state_dict()}` (the same
model entry as a training checkpoint, so both load the same way, at any TP/PP/DP layout), plus `mdpo_model.json`
(the model description, so training needs no hand-copied hyperparameters), the source's config.json and its
tokenizer/auxiliary files. At 1 x 1 one process writes in parts of about one HF shard (`checkpoint.dcp_merge`);
a larger layout runs one process per (TP, PP) rank, each building its stage, reading only the HF tensors that stage
needs, one at a time, and keeping only its shard of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from megatron.core import dist_checkpointing, parallel_state
from safetensors.torch import save_file

from mdpo import parallel, startup
from mdpo.checkpoint.check import check_conversion
from mdpo.checkpoint.dcp_merge import write_in_parts
from mdpo.checkpoint.description import arch_fields, describe_model, export_origin, stored_model_fields
from mdpo.checkpoint.files import MODEL_FILE, MODEL_FORMAT, TRAINING_META
from mdpo.checkpoint.hf import CARRIED_FILE, HFWeights, carried_tensors, copy_auxiliary
from mdpo.checkpoint.hf_export import write_hf_export, write_peft_adapter
from mdpo.checkpoint.load import (
    checkpoint_lora,
    load_hf_weights,
    load_lora_checkpoint,
    load_megatron_weights,
    lora_meta,
    open_hf,
)
from mdpo.config import FLAG_WORDING, Layout, ModelConfig
from mdpo.errors import MdpoError, cause
from mdpo.models import families, sharding
from mdpo.models.families.base import Family
from mdpo.models.gpt import build_gpt_model, transformer_config
from mdpo.models.lora import merge_adapters, split_adapters


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
    return describe_model({"init_from": str(hf_dir), "position_embedding": position_embedding})


def _write_stage(rank: int, world: int, port: int, hf_dir: str, tmp: str, model: ModelConfig, layout: Layout):
    """One (TP, PP) rank of HF -> Megatron: build the stage, stream its tensors in, save collectively."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    startup.prepare()
    parallel.start(layout)
    try:
        dtype = HFWeights(hf_dir).dtype()
        config = transformer_config(
            model, tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp, params_dtype=dtype, init_weights=False
        )
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


@dataclass(frozen=True)
class Check:
    """`--check`: compare the result against an independent forward on `rows` rows of `data` (None: generated
    ids) and fail over the tolerance (`checkpoint.check`)."""

    data: Path | None = None
    rows: int = 4

    def __post_init__(self) -> None:  # before any conversion work, not after it
        if self.rows < 1:
            raise MdpoError(f"--check-rows must be >= 1, got {self.rows}")


def _write_in_processes(hf_dir: Path, tmp: Path, model: ModelConfig, layout: Layout) -> None:
    """One writer process per (TP, PP, EP) rank, each holding its share of the model (under EP: its experts only):
    forked where there is no CUDA (the writers start with torch and megatron imported: seconds each, not tens); a
    CUDA process cannot be forked, nor one holding a process group (a Python caller inside a world), so those
    spawn."""
    args = (layout.world, parallel.free_port(), str(hf_dir), str(tmp), model, layout)
    start_method = "spawn" if torch.cuda.is_available() or parallel.holds_process_group() else "fork"
    try:
        mp.start_processes(_write_stage, args=args, nprocs=layout.world, start_method=start_method)
    except mp.ProcessRaisedException as err:
        raise MdpoError(f"conversion failed: {cause(err)}") from None


def hf_to_megatron(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    position_embedding: str = "auto",
    part_bytes: int | None = None,
    check: Check | None = None,
    ep: int = 1,
) -> Path:
    """`mdpo convert hf-to-megatron`: everything is checked here before any writing starts. At 1 x 1 one process
    writes in parts of about one HF shard (`part_bytes`, default the largest shard's size); a larger layout is
    written by TP x PP x EP processes, each holding its share of the model (under EP: its experts only)."""
    startup.prepare()
    hf_dir, out = Path(hf_dir), Path(out)
    model = describe_hf(hf_dir, position_embedding)
    # experts with biases (gpt-oss) whole on every rank: Megatron-Core's MoE layer takes their biases only unsplit
    etp = 1 if model.is_moe and model.linear_bias else None
    layout = Layout(tp=tp, pp=pp, dp=ep, ep=ep, etp=etp, wording=FLAG_WORDING)
    layout.check_model(
        model.num_attention_heads,
        model.num_key_value_heads,
        model.num_hidden_layers,
        model.num_experts,
        model.expert_width,
        expert_bias=model.linear_bias,
    )
    weights = open_hf(hf_dir, model)
    weights.dtype()  # one dtype, or an error naming the mix
    tmp = _fresh_output(out)
    if layout.world == 1:
        write_in_parts(weights, tmp, model, part_bytes or max(p.stat().st_size for p in weights.shard_files))
    else:
        _write_in_processes(hf_dir, tmp, model, layout)
    description = {
        "format": MODEL_FORMAT,
        "version": 1,
        "model": arch_fields(model),
        "written_layout": {"tp": tp, "pp": pp, "ep": ep},
        "source": str(hf_dir.resolve()),
    }
    (tmp / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")
    shutil.copy2(hf_dir / "config.json", tmp / "config.json")
    copy_auxiliary(hf_dir, tmp)
    _keep_carried(hf_dir, tmp, families.get(model.family), model.num_hidden_layers)
    _finish(tmp, out)
    if check is not None:
        check_conversion(hf_dir, out, model, check.data, check.rows)
    return out


def _keep_carried(hf_dir: Path, out: Path, family: Family, num_layers: int) -> None:
    """A converted checkpoint is the origin of its exports: it keeps what the family carries untrained (a vision
    tower, multi-token prediction layers) in CARRIED_FILE."""
    carried = dict(carried_tensors(family, hf_dir, num_layers))
    if carried:
        save_file(carried, str(out / CARRIED_FILE))
        print(f"{len(carried)} tensors mdpo does not train ({family.carried_names()}) kept in {CARRIED_FILE}")


def megatron_to_hf(ckpt: str | Path, out: str | Path, check: Check | None = None, adapter: bool = False) -> Path:
    """`mdpo convert megatron-to-hf`: a converted or training checkpoint -> a HF folder of the model's family, in
    the checkpoint's dtype, vocab padding stripped. A LoRA run's checkpoint is exported merged into its base, or
    with `adapter` as a PEFT adapter folder (asked of any other checkpoint: refused)."""
    startup.prepare()
    ckpt, out = Path(ckpt), Path(out)
    if stored_model_fields(ckpt) is None:
        raise MdpoError(f"{ckpt}: not a mdpo Megatron checkpoint (no {MODEL_FILE} or {TRAINING_META})")
    meta = lora_meta(ckpt)
    if adapter and meta is None:
        raise MdpoError(f"{ckpt}: --adapter needs a LoRA run's checkpoint (lora.rank > 0); this one holds full weights")
    model = describe_model({"init_from": str(ckpt)})
    tmp = _fresh_output(out)
    parallel.start(Layout())
    try:
        try:
            dtype = dist_checkpointing.load_tensors_metadata(str(ckpt))["embedding.word_embeddings.weight"].dtype
        except KeyError:  # a LoRA checkpoint holds adapters only: the dtype of its first adapter
            dtype = next(iter(dist_checkpointing.load_tensors_metadata(str(ckpt)).values())).dtype
        except Exception as err:
            raise MdpoError(f"{ckpt}: cannot read the checkpoint's metadata ({err})") from None
        lora = checkpoint_lora(ckpt)
        config = transformer_config(model, params_dtype=dtype, init_weights=False)
        module = build_gpt_model(model, config, lora=lora)
        if lora is None:
            load_megatron_weights(module, ckpt)
        else:
            load_lora_checkpoint(module, ckpt, model)
        # norm weights are fp32 in Megatron: everything goes back in the checkpoint's dtype (exact for bf16 -> fp32)
        # but a router's expert bias, float32 in Megatron and in DeepSeek V3's release (`hf.FLOAT32_KEPT`): bf16
        # would round away the steps of its update (model.router_bias_update_rate)
        full = {
            sharding.te_name_inverse(k): v if k.endswith(".expert_bias") else v.to(dtype)
            for k, v in module.state_dict().items()
            if "_extra_state" not in k
        }
        if adapter:
            write_peft_adapter(tmp, split_adapters(full)[1], model, lora, meta["config"]["model"].get("init_from"))
        else:
            write_hf_export(tmp, merge_adapters(full, lora.scaling) if lora else full, model, export_origin(ckpt))
    finally:
        parallel.stop()
    _finish(tmp, out)
    if check is not None and not adapter:
        check_conversion(out, ckpt, model, check.data, check.rows)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`mdpo convert`'s two directions and their arguments (`--check` on both)."""
    directions = parser.add_subparsers(dest="direction", required=True)
    to_mcore = directions.add_parser(
        "hf-to-megatron",
        help="HF folder of a supported family (docs/model-families.md) -> reshardable Megatron checkpoint",
        description="Writes with --tp x --pp x --ep processes (each holds its part of the model); the checkpoint "
        "loads at any TP/PP/EP/DP layout. Point model.init_from at the output to train from it.",
    )
    to_mcore.add_argument("--hf", required=True, help="HF model folder (config.json, safetensors or .bin)")
    to_mcore.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with (default 1)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with (default 1)")
    to_mcore.add_argument(
        "--ep", type=int, default=1, help="mixture of experts: expert-parallel size to write with (default 1)"
    )
    to_mcore.add_argument(
        "--position-embedding",
        choices=("auto", "rope", "alibi"),
        default="auto",
        help="Baichuan 2: auto = RoPE when hidden_size is 4096 (7B), else ALiBi (13B)",
    )
    to_hf = directions.add_parser(
        "megatron-to-hf", help="converted or training checkpoint (step_N folder) -> HF folder of the model's family"
    )
    to_hf.add_argument("--ckpt", required=True, help="mdpo convert output or training checkpoint folder")
    to_hf.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_hf.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's checkpoint: write its adapters as a PEFT folder (default: merged into the base, a full "
        "HF folder)",
    )
    for direction in (to_mcore, to_hf):
        direction.add_argument(
            "--check",
            action="store_true",
            help="after converting, compare mdpo's forward of the Megatron checkpoint with an independent forward "
            "of the HF folder (float32; exit 2 over max |logit error| 1e-4)",
        )
        direction.add_argument(
            "--check-data", help="compare on prompt + chosen of this data file's first pairs (default: generated ids)"
        )
        direction.add_argument("--check-rows", type=int, help="rows to compare (default 4)")
    return parser
