"""MXFP4 weights as the released gpt-oss checkpoints hold their experts: `<name>_blocks` and `<name>_scales` in
place of `<name>`, read back into the tensor they stand for exactly as transformers dequantizes them
(`integrations/mxfp4.py`), so that mdpo starts from the weights transformers' own class runs.

The format (OCP Microscaling, FP4 E2M1 with an E8M0 scale per block of 32): `blocks` [experts, rows, groups, 16]
uint8, two 4-bit codes a byte (the low nibble first), `scales` [experts, rows, groups] uint8, a power of two biased
by 127 for each group of 32 values. The values of a row run along the groups; the tensor is stored transposed, so
`<name>` is [experts, groups x 32, rows] (gpt-oss's [experts, in, out])."""

from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
# FP4 E2M1 codes 0..15: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quantized_pairs(names: set[str]) -> dict[str, tuple[str, str]]:
    """`<name>` -> (its blocks' name, its scales' name) for every MXFP4 tensor among `names`; ValueError naming a
    blocks tensor without its scales, or scales without their blocks."""
    pairs = {}
    for name in sorted(names):
        for have, want in ((BLOCKS, SCALES), (SCALES, BLOCKS)):
            if name.endswith(have):
                base = name.removesuffix(have)
                if base + want not in names:
                    raise ValueError(f"MXFP4 tensor '{name}' has no '{base + want}' beside it")
                pairs[base] = (base + BLOCKS, base + SCALES)
    return pairs


def dequantized_shape(blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The shape of the tensor MXFP4 `blocks` and `scales` stand for; ValueError naming it when they do not fit."""
    if len(blocks_shape) != 4 or tuple(blocks_shape[:-1]) != tuple(scales_shape):
        raise ValueError(
            f"MXFP4 tensor '{name}': blocks {tuple(blocks_shape)} and scales {tuple(scales_shape)} do not fit "
            "([experts, rows, groups, bytes] and [experts, rows, groups])"
        )
    experts, rows, groups, width = blocks_shape
    return (experts, groups * width * 2, rows)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [experts, groups x 32, rows] tensor of `dtype` that MXFP4 `blocks` [experts, rows, groups, 16] and
    `scales` [experts, rows, groups] stand for: each code's FP4 value times 2^(scale - 127), computed in `dtype` as
    transformers does (exact: every value is a power of two times one of the eight magnitudes)."""
    table = torch.tensor(FP4_VALUES, dtype=dtype)
    codes = blocks.to(torch.uint8)
    low, high = table[(codes & 0x0F).long()], table[(codes >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [experts, rows, groups, 32]: low nibble first
    exponents = (scales.to(torch.int32) - 127)[..., None]
    values = torch.ldexp(values, exponents).to(dtype)
    return values.flatten(-2).transpose(1, 2).contiguous()
