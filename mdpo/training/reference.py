"""Precomputed reference log-probs: one forward pass of the reference over the data set, cached on disk.

With `dpo.reference=precomputed` training never builds the reference model. The cache is stamped with hashes of
the reference checkpoint, the tokenizer, the data settings and LD-DPO's weight; a cache whose stamp differs, or
that lacks a pair the run needs, is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mdpo.config import TrainConfig
from mdpo.errors import MdpoError

STAMP_PARTS = ("reference checkpoint", "tokenizer", "data", "LD-DPO weighting (dpo.ld_alpha)")
# Data settings that do not change the tokens (the files themselves are hashed by content).
_NOT_TOKEN_SETTINGS = ("train_file", "eval_file", "num_proc", "cache", "cache_dir")


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: str) -> list[Path]:
    return [p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")]


def reference_stamp(cfg: TrainConfig) -> dict[str, str | None]:
    """What the reference log-probs depend on, hashed per part so a mismatch can be named."""
    data_settings = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _NOT_TOKEN_SETTINGS}
    data_files = [Path(f) for f in (cfg.data.train_file, cfg.data.eval_file) if f]
    data_digest = hashlib.sha256(json.dumps(data_settings, sort_keys=True).encode())
    data_digest.update(_hash_files(data_files).encode())
    return {
        "reference checkpoint": _hash_files(_folder_files(cfg.model.init_from)),
        "tokenizer": _hash_files(_folder_files(cfg.data.tokenizer)),
        "data": data_digest.hexdigest(),
        # absent (as in caches made before it existed) when off
        "LD-DPO weighting (dpo.ld_alpha)": None if cfg.dpo.ld_alpha is None else repr(cfg.dpo.ld_alpha),
    }


def cache_path(cfg: TrainConfig, split: str) -> Path:
    folder = Path(cfg.dpo.reference_cache or Path(cfg.logging.run_dir) / "reference_logps")
    return folder / f"{split}.safetensors"


def save_reference_logps(
    path: Path, indices: list[int], chosen: list[float], rejected: list[float], stamp: dict[str, str | None]
) -> None:
    """Atomic: written to a temporary name and renamed, so a crash never leaves a partial cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "index": torch.tensor(indices, dtype=torch.int64),
        "chosen": torch.tensor(chosen, dtype=torch.float64),
        "rejected": torch.tensor(rejected, dtype=torch.float64),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"stamp": json.dumps(stamp, sort_keys=True)})
    os.replace(tmp, path)


class ReferenceLogps:
    """Per-pair reference log-probs looked up by dataset index."""

    def __init__(self, path: Path, stamp: dict[str, str | None], needed: list[int]) -> None:
        if not path.exists():
            raise MdpoError(f"{path}: no precomputed reference log-probs; run `mdpo precompute-ref CONFIG.yaml` first")
        with safe_open(str(path), framework="pt") as handle:
            saved = json.loads((handle.metadata() or {}).get("stamp", "{}"))
            index, chosen, rejected = (handle.get_tensor(k) for k in ("index", "chosen", "rejected"))
        changed = [part for part in STAMP_PARTS if saved.get(part) != stamp[part]]
        if changed:
            raise MdpoError(
                f"{path}: stale reference cache: the {' and the '.join(changed)} changed since it was computed; "
                "run `mdpo precompute-ref` again"
            )
        self.table = {int(i): (c, r) for i, c, r in zip(index.tolist(), chosen.tolist(), rejected.tolist())}
        missing = [i for i in needed if i not in self.table]
        if missing:
            raise MdpoError(f"{path}: partial reference cache: {len(missing)} pairs missing (first: pair {missing[0]})")

    def lookup(self, pair_ids: list[int], dtype: torch.dtype, device) -> torch.Tensor:
        """[2m] in the micro-batch's row order: m chosen, then m rejected."""
        values = [self.table[i][0] for i in pair_ids] + [self.table[i][1] for i in pair_ids]
        return torch.tensor(values, dtype=dtype, device=device)
