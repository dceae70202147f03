"""FP8 weights as DeepSeek V3's released checkpoints hold most linear layers: `<name>` in float8_e4m3fn beside
`<name>_scale_inv`, one float32 scale per block of `weight_block_size` (config.json's `quantization_config`, 128 x 128
in the release), read back into the tensor they stand for as DeepSeek's published reference dequantizes them
(`weight_dequant` in its inference code): each value as float32 times its block's scale, then in the dtype asked.

A [rows, cols] weight has a [ceil(rows / block_rows), ceil(cols / block_cols)] scale: the last block of a dimension
that is not a multiple of the block is partial and has a scale of its own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SCALE = "_scale_inv"
DTYPE = torch.float8_e4m3fn
DEFAULT_BLOCK = (128, 128)  # DeepSeek V3's, and its reference's only one


def _quantization(folder: Path) -> dict:
    """config.json's `quantization_config` ({} without one)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return config.get("quantization_config") or {}


def block_scaled(folder: Path) -> bool:
    """Whether the folder's config.json says its weights are FP8 (`quant_method: fp8`)."""
    return _quantization(folder).get("quant_method") == "fp8"


def block_size(folder: Path) -> tuple[int, int]:
    """The folder's `quantization_config.weight_block_size` (config.json; DEFAULT_BLOCK where it says none)."""
    block = _quantization(folder).get("weight_block_size", DEFAULT_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"config.json: quantization_config.weight_block_size={block!r}, expected [rows, cols] > 0")
    return tuple(block)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale of a [rows, cols] weight: one per block, the partial last blocks included."""
    return tuple(math.ceil(size / b) for size, b in zip(shape, block))


def quantized_pairs(
    shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], block: tuple[int, int]
) -> dict[str, str]:
    """`<name>` -> its scale's name for every FP8 tensor among `shapes`; ValueError naming an FP8 tensor without its
    scale, a scale without its FP8 tensor, or a scale whose shape does not fit its tensor's blocks."""
    pairs = {}
    for name in sorted(shapes):
        if name.endswith(SCALE) and dtypes.get(name.removesuffix(SCALE)) != DTYPE:
            raise ValueError(f"FP8 scale '{name}' has no float8_e4m3fn tensor '{name.removesuffix(SCALE)}' beside it")
        if dtypes[name] != DTYPE:
            continue
        scale = name + SCALE
        if scale not in shapes:
            raise ValueError(f"FP8 tensor '{name}' has no '{scale}' beside it")
        want = scale_shape(shapes[name], block) if len(shapes[name]) == 2 else None
        if want is None or tuple(shapes[scale]) != want:
            raise ValueError(
                f"FP8 tensor '{name}' {tuple(shapes[name])}: its scale '{scale}' has shape {tuple(shapes[scale])}, "
                f"blocks of {list(block)} need {want}"
            )
        pairs[name] = scale
    return pairs


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    """The [rows, cols] tensor of `dtype` that an FP8 `weight` and its per-block `scale_inv` stand for: as
    DeepSeek's reference computes it, float32 products rounded once into `dtype`."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)
