"""`mdpo precompute-ref`: the reference forward once over the train and eval pairs, at any TP/PP/DP layout, written
per split to the reference cache with the stamp `dpo.reference=precomputed` checks."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from mdpo import parallel
from mdpo.config import TrainConfig
from mdpo.data.batching import rank_share
from mdpo.errors import ConfigError
from mdpo.models import families
from mdpo.training.console import log
from mdpo.training.data import load_pairs_on_ranks
from mdpo.training.reference import OnlineReference, cache_path, reference_stamp, save_reference_logps
from mdpo.training.run_lock import lock_run
from mdpo.training.setup import FORWARD_CHUNK, build_model, start_run


def precompute_reference(cfg: TrainConfig) -> list[Path]:
    """The reference's log-probs of every train (and eval) pair, one cache file per split; returns the files."""
    if cfg.model.init_from is None:
        raise ConfigError("precompute-ref needs model.init_from (the reference checkpoint)")
    lock = None
    try:
        run = start_run(cfg)
        lock = lock_run({"logging.run_dir": Path(cfg.logging.run_dir)})
        reference = OnlineReference(build_model(cfg, run.layout, run.dtype, load=True), run.scorer)
        stamp = reference_stamp(cfg)
        written = []
        for split, path in (("train", cfg.data.train_file), ("eval", cfg.data.eval_file)):
            if not path:
                continue
            template = families.get(cfg.model.family).default_template
            pairs = load_pairs_on_ranks(cfg.data, path, run.tokenizer, split, template, training_seed=cfg.schedule.seed)
            mine = rank_share(range(len(pairs)), run.ranks.dp, run.layout.dp)
            everything = run.microbatches(cfg, pairs, mine)
            results: list[tuple[list[int], list[float]]] = []
            chunks = tqdm(
                run.device_chunks(everything),
                desc=f"reference {split}",
                disable=not run.is_logger,
                total=-(-len(everything) // FORWARD_CHUNK),
            )
            for microbatches in chunks:
                logps = reference.logps(microbatches, split)
                if parallel_state.is_pipeline_last_stage() and run.ranks.tp == run.ranks.cp == 0:
                    results += [(mb.pair_ids, lp.double().cpu().tolist()) for mb, lp in zip(microbatches, logps)]
            gathered = [None] * torch.distributed.get_world_size() if run.is_logger else None
            torch.distributed.gather_object(results, gathered, dst=0)
            if gathered is not None:
                table = {}
                for ids, logps in (item for part in gathered for item in part):
                    m = len(ids)
                    table.update({pid: (logps[k], logps[m + k]) for k, pid in enumerate(ids)})
                indices = sorted(table)
                target = cache_path(cfg, split)
                save_reference_logps(
                    target, indices, [table[i][0] for i in indices], [table[i][1] for i in indices], stamp
                )
                log(f"reference log-probs of {len(indices)} {split} pairs -> {target}")
                written.append(target)
            torch.distributed.barrier()
        return written
    finally:
        if lock is not None:
            lock.release()
        parallel.stop()
