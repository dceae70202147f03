"""Read and write HF model folders (safetensors; legacy .bin only with weights_only=True)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mdpo.errors import MdpoError


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model folder; never unpickles arbitrary objects."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            try:
                state.update(load_file(str(shard)))
            except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
                raise MdpoError(f"{shard}: cannot read safetensors file ({err})") from None
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise MdpoError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
    state = {}
    for shard in bins:
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return state


def write_hf_llama(folder: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """A folder `transformers` loads: config.json and one safetensors file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder
