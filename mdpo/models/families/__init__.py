"""Supported HF model families, found from a config.json."""

from __future__ import annotations

from mdpo.models.families import baichuan, llama, qwen
from mdpo.models.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, qwen.FAMILY, baichuan.FAMILY)}


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {supported()}")
    return FAMILIES[name]


def detect(hf_config: dict) -> Family:
    """The family of a config.json, by its architecture (else model_type); unknown ones name the supported list."""
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if family.architecture in architectures:
            if model_type not in (None, family.model_type):
                raise ValueError(f"model_type={model_type!r} with architecture {family.architecture} is not supported")
            return family
    for family in FAMILIES.values():
        if model_type == family.model_type and not architectures:
            return family
    found = architectures[0] if architectures else f"model_type={model_type!r}"
    raise ValueError(f"unsupported architecture {found}; supported: {supported()}")


def owner(tensor_names: set[str]) -> Family | None:
    """The family whose tensor names these are, judged by its global and first-layer tensors (to tell a user that
    config.json and the weights disagree)."""
    for family in FAMILIES.values():
        if family.hf_names(1) <= tensor_names:
            return family
    return None
