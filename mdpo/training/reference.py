"""The reference: where a step's reference log-probs come from, one class per mode, built once from the config
(`build_reference`) and used by training, `mdpo eval` and `mdpo precompute-ref` alike:

- `OnlineReference`: frozen model chunks run forward-only (a copy of the starting policy, or a model folder); with
  TR-DPO (`dpo.sync_ref_model`) its weights move toward the policy after every N-th step and are training state.
- `AdaptersOffReference`: with LoRA, the policy itself with its adapters switched off (no second copy).
- `PrecomputedReference`: the on-disk cache of one earlier forward pass (`mdpo precompute-ref`). It is stamped with
  hashes of the reference checkpoint, the tokenizer, the data settings and LD-DPO's weight; a cache whose stamp
  differs, or that lacks a pair the run needs, is refused with the reason.
- `NoReference`: reference-free objectives (the loss reads zeros).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from megatron.core.distributed import DistributedDataParallel
from safetensors import safe_open
from safetensors.torch import save_file

from mdpo.config import DataConfig, DPOConfig, TrainConfig
from mdpo.data.batching import MicroBatch
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import MdpoError
from mdpo.models.lora import adapters_off
from mdpo.training.reference_sync import sync_reference
from mdpo.training.setup import Run, build_model, frozen
from mdpo.training.step import Scorer, forward_logps

STAMP_PARTS = ("reference checkpoint", "tokenizer", "data", "LD-DPO weighting (dpo.ld_alpha)")
# Data settings that do not change the tokens (the files themselves are hashed by content).
_NOT_TOKEN_SETTINGS = ("train_file", "eval_file", "num_proc", "cache", "cache_dir")
# Data settings newer than the first stamped caches: left out while they hold their defaults (the pairs those caches
# were computed for), so such caches stay valid
_LATER_SETTINGS = ("rank_pairs", "min_score_gap", "score_key", "seed", "chat_template_kwargs", "train_empty_think")


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
    defaults = dataclasses.asdict(DataConfig())
    data_settings = {
        k: v
        for k, v in dataclasses.asdict(cfg.data).items()
        if k not in _NOT_TOKEN_SETTINGS and not (k in _LATER_SETTINGS and v == defaults[k])
    }
    if cfg.data.rank_pairs == "best_vs_random":  # its draws follow schedule.seed where data.seed is unset
        data_settings["seed"] = cfg.data.rank_seed(cfg.schedule.seed)
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


class Reference:
    """A step's reference log-probs, per micro-batch ([2m]: chosen, then rejected; read on the last pipeline stage),
    plus what the reference does after an optimizer step and the weights it keeps as training state."""

    def logps(self, microbatches: list[MicroBatch], split: str = "train") -> list[torch.Tensor | None]:
        raise NotImplementedError

    def after_step(self, step: int, policy: list[DistributedDataParallel]) -> None:
        """After optimizer step `step` (1-based): nothing, unless the reference moves (TR-DPO)."""

    def state(self) -> list[torch.nn.Module] | None:
        """Model chunks whose weights are training state (saved in checkpoints and restored), or None."""
        return None


class OnlineReference(Reference):
    """Frozen model chunks of this rank's stage, run forward-only over the step's micro-batches. With `sync`
    (TR-DPO, `dpo.sync_ref_model`), after every `ref_model_sync_steps`-th step the reference becomes
    alpha policy + (1 - alpha) reference (a skipped step counts too, as TRL's callback runs at every step end; the
    policy mixed in is then the last finite one), and its weights are training state."""

    def __init__(self, chunks: list[torch.nn.Module], scorer: Scorer, sync: DPOConfig | None = None) -> None:
        self.chunks, self.scorer, self.sync = frozen(chunks), scorer, sync

    def logps(self, microbatches: list[MicroBatch], split: str = "train") -> list[torch.Tensor | None]:
        return forward_logps(microbatches, self.chunks, self.scorer)

    def after_step(self, step: int, policy: list[DistributedDataParallel]) -> None:
        if self.sync is None or step % self.sync.ref_model_sync_steps:
            return
        for ref, chunk in zip(self.chunks, policy, strict=True):
            if chunk.ddp_config.overlap_param_gather:  # the updated weights are still shards: gather them first
                chunk.start_param_sync(force_sync=True)
            sync_reference(ref, chunk.module, self.sync.ref_model_mixup_alpha)

    def state(self) -> list[torch.nn.Module] | None:
        return self.chunks if self.sync is not None else None


class AdaptersOffReference(Reference):
    """LoRA's reference: the policy's own chunks with every adapter switched off (the frozen base)."""

    def __init__(self, policy: list[DistributedDataParallel], scorer: Scorer) -> None:
        self.policy, self.scorer = policy, scorer

    def logps(self, microbatches: list[MicroBatch], split: str = "train") -> list[torch.Tensor | None]:
        with adapters_off([chunk.module for chunk in self.policy]):
            return forward_logps(microbatches, self.policy, self.scorer)


class PrecomputedReference(Reference):
    """The cache of `mdpo precompute-ref`, per split, checked against the run (stamp, every pair needed)."""

    def __init__(self, cfg: TrainConfig, splits: dict[str, list[TokenizedPair]]) -> None:
        stamp = reference_stamp(cfg)
        self.caches = {
            split: ReferenceLogps(cache_path(cfg, split), stamp, [p.index for p in pairs])
            for split, pairs in splits.items()
            if pairs
        }

    def logps(self, microbatches: list[MicroBatch], split: str = "train") -> list[torch.Tensor | None]:
        cache = self.caches[split]
        return [cache.lookup(mb.pair_ids, torch.float32, mb.tokens.device) for mb in microbatches]


class NoReference(Reference):
    """Reference-free objectives: no log-probs (the loss reads zeros)."""

    def logps(self, microbatches: list[MicroBatch], split: str = "train") -> list[torch.Tensor | None]:
        return [None] * len(microbatches)


def build_reference(
    cfg: TrainConfig,
    run: Run,
    *,
    policy: list[DistributedDataParallel] | None = None,
    splits: dict[str, list[TokenizedPair]] | None = None,
    weights_from: str | None = None,
) -> Reference:
    """The reference `cfg.dpo.reference` asks for: with `weights_from` (a model folder: `mdpo eval --reference`,
    `precompute-ref`) an online reference of those weights; otherwise the training run's, from its `policy` (a
    frozen copy of its starting weights, or with LoRA the policy with adapters off) or the cache of its `splits`."""
    mode = cfg.dpo.reference
    if mode == "none":
        return NoReference()
    if mode == "precomputed":
        return PrecomputedReference(cfg, splits or {})
    if weights_from is not None:
        own = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=weights_from))
        return OnlineReference(build_model(own, run.layout, run.dtype, load=True), run.scorer)
    if cfg.lora.enabled:
        return AdaptersOffReference(policy, run.scorer)
    # an exact copy of the starting policy (its chunks, before training)
    chunks = build_model(cfg, run.layout, run.dtype, load=False)
    for ref, chunk in zip(chunks, policy, strict=True):
        ref.load_state_dict(chunk.module.state_dict())
    return OnlineReference(chunks, run.scorer, cfg.dpo if cfg.dpo.sync_ref_model else None)
