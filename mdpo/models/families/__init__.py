"""The registry of HF model families, the one list of them (each a `Family` record, in its own module): a family
found from a config.json, and the model description a config.json gives. Everything else that names families (the
planner's presets, `mdpo convert --check`'s oracles, the tests' fixtures) is derived from `FAMILIES`."""

from __future__ import annotations

import json
import os
from typing import Any

from mdpo.errors import ConfigError
from mdpo.models.families import (
    baichuan,
    deepseek_v2,
    deepseek_v3,
    gemma3,
    glm4_moe,
    gpt_oss,
    llama,
    mistral,
    mixtral,
    olmo2,
    qwen,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from mdpo.models.families.base import Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llama.FAMILY,
        qwen.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        mistral.FAMILY,
        baichuan.FAMILY,
        qwen3_moe.FAMILY,
        qwen2_moe.FAMILY,
        mixtral.FAMILY,
        olmo2.FAMILY,
        olmo2.OLMO3_FAMILY,
        gemma3.FAMILY,
        gemma3.MULTIMODAL,
        gpt_oss.FAMILY,
        deepseek_v3.FAMILY,
        deepseek_v2.FAMILY,
        glm4_moe.FAMILY,
    )
}


def supported() -> str:
    """Each family's architectures and name, for the messages that list them."""
    return ", ".join(f"{'/'.join(f.architectures)} ({f.name})" for f in FAMILIES.values())


def get(name: str) -> Family:
    """The family of a `model.family` value (a description that passed `describe_model` holds a registered one)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {supported()}")
    return FAMILIES[name]


def detect(hf_config: dict) -> Family:
    """The family of a config.json, by its architecture (else model_type); unknown ones name the supported list."""
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        named = [name for name in architectures if name in family.architectures]
        if named:
            if model_type not in (None, family.model_type):
                raise ValueError(f"model_type={model_type!r} with architecture {named[0]} is not supported")
            return family
    for family in FAMILIES.values():
        if model_type == family.model_type and not architectures:
            return family
    found = architectures[0] if architectures else f"model_type={model_type!r}"
    raise ValueError(f"unsupported architecture {found}; supported: {supported()}")


def owners(tensor_names: set[str]) -> list[Family]:
    """The families whose tensor names these could be, judged by their global and first-layer tensors, heads tied
    or not (to tell a user that config.json and the weights disagree; Llama and Mistral share every name)."""
    return [
        family
        for family in FAMILIES.values()
        if family.hf_names(1, tied=True, expert_layers=(0,) if family.moe_tensors else ()) <= tensor_names
    ]


def read_hf_config(key: str, source: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(file, ModelConfig fields, the family's name among them) of a HF config.json or of the model folder holding
    it; `key` is the config key that named it, for the error messages."""
    file = os.path.join(source, "config.json") if os.path.isdir(source) else os.fspath(source)
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except OSError as e:
        raise ConfigError(f"{key}='{source}': cannot read '{file}': {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}='{source}': '{file}' is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{key}='{source}': '{file}' must hold a JSON object, got {type(hf).__name__}")
    try:
        family = detect(hf)
    except ValueError as e:
        raise ConfigError(f"{key}='{source}': {file}: {e}") from None
    try:
        values = family.read_config(hf)
    except ValueError as e:  # (what, and optionally what is supported instead)
        supported = f" ({e.args[1]})" if len(e.args) > 1 else ""
        message = f"{e.args[0]} is not supported by mdpo's {family.name} model{supported}"
        raise ConfigError(f"{key}='{source}': {file}: {message}") from None
    return file, {"family": family.name, **values}
