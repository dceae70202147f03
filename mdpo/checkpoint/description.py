"""What model a folder holds: the description stored in a mdpo checkpoint, or a HF folder's config.json.

`describe_model` is what `load_config` calls to fill the model section from `model.hf_config` / `model.init_from`;
the converters and the planner describe folders the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mdpo.checkpoint.files import MODEL_FILE, MODEL_FORMAT, TRAINING_META
from mdpo.config import ModelConfig, coerce_field
from mdpo.errors import ConfigError, MdpoError
from mdpo.models import families

# The ModelConfig fields that describe the architecture (the rest say where weights come from or how to run).
ARCH_FIELDS = (
    "family",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "qkv_bias",
    "qk_norm",
    "qk_norm_span",
    "norm_position",
    "zero_centered_norms",
    "hidden_act",
    "glu_clamp",
    "glu_linear_offset",
    "linear_bias",
    "attention_sinks",
    "query_pre_attn_scalar",
    "scale_embeddings",
    "tie_word_embeddings",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_position_embeddings",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_mscale",
    "rope_mscale_all_dim",
    "rope_attention_factor",
    "rope_truncate",
    "partial_rotary_factor",
    "sliding_window",
    "sliding_window_layers",
    "window_rope_theta",
    "position_embedding",
    "norm_head",
    "num_experts",
    "moe_topk",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "moe_layers",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "shared_expert_gate",
    "router_score",
    "router_expert_bias",
    "routed_scaling_factor",
    "router_groups",
    "router_group_topk",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def arch_fields(model: ModelConfig) -> dict[str, Any]:
    return {name: getattr(model, name) for name in ARCH_FIELDS}


def stored_model_fields(source: str | os.PathLike[str]) -> tuple[str, dict[str, Any]] | None:
    """(file, architecture fields) of a `mdpo convert` output or a training checkpoint; None for anything else."""
    folder = Path(source)
    if (folder / MODEL_FILE).is_file():
        file = folder / MODEL_FILE
        data = json.loads(file.read_text())
        if data.get("format") != MODEL_FORMAT:
            raise MdpoError(f"{file}: not a {MODEL_FORMAT} description")
        return str(file), data["model"]
    if (folder / TRAINING_META).is_file():
        file = folder / TRAINING_META
        model = json.loads(file.read_text())["config"]["model"]
        return str(file), {name: model[name] for name in ARCH_FIELDS if name in model}
    return None


def describe_model(fields: dict[str, Any]) -> ModelConfig:
    """The model section's values, filled from `hf_config` (or `init_from`): a HF config.json (its family found
    from `architectures`) or the description stored in a `mdpo convert` output or training checkpoint.

    A field set away from its default must agree with that source. Features the model cannot describe (rope
    scaling, tied embeddings, ...), unknown architectures and a `model.family` the registry does not hold (the
    config, a leaf, cannot know them) are ConfigErrors."""
    family = fields.get("family", _DEFAULTS["family"])
    if family not in families.FAMILIES:
        raise ConfigError(f"model.family must be one of {', '.join(families.FAMILIES)}, got {family!r}")
    key, source = "model.hf_config", fields.get("hf_config")
    if source is None and fields.get("init_from") is not None:
        key, source = "model.init_from", fields["init_from"]
    if source is None:
        return ModelConfig(**fields)
    stored = stored_model_fields(source)
    file, values = stored if stored is not None else families.read_hf_config(key, source)
    described = dict(fields)
    for name, value in values.items():
        try:
            value = coerce_field(ModelConfig, name, value)
        except ValueError as err:
            raise ConfigError(f"{key}='{source}': {file}: {err}") from None
        current = fields.get(name, _DEFAULTS[name])
        if name == "position_embedding" and current != "auto":
            continue  # config.json cannot say (Baichuan 2): the user's explicit choice wins
        if current != _DEFAULTS[name] and current != value:
            raise ConfigError(
                f"model.{name}={current!r} conflicts with {name}={value!r} in {file} ({key}); "
                f"drop model.{name} or make them agree"
            )
        described[name] = value
    return ModelConfig(**described)


def export_origin(folder: Path) -> Path | None:
    """The folder whose config.json and tokenizer files an export of a model that started from `folder` reuses:
    the HF folder itself, a converted checkpoint, or what a training checkpoint's run started from."""
    if (folder / TRAINING_META).is_file():
        init_from = json.loads((folder / TRAINING_META).read_text())["config"]["model"].get("init_from")
        return export_origin(Path(init_from)) if init_from else None
    return folder if (folder / "config.json").is_file() else None


_SAMPLE_BYTES = 1 << 20


def base_fingerprint(folder: str | os.PathLike[str]) -> str:
    """What a LoRA checkpoint names its base model by: a hash of each file's name and size and of its first and last
    MiB (two fine-tunes of one architecture differ there; reading all of a 13B model at every start would not pay)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            if size > _SAMPLE_BYTES:
                handle.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:16]
