"""Held-out evaluation: forward-only DPO metrics of a set of pairs, TRL's names with the `eval_` prefix.

One function for both callers, so that `mdpo eval` reports the very numbers training logs for the same file:
`Trainer.evaluate` (the run's eval set, the run's reference) and the `mdpo eval` command (any model folder)."""

from __future__ import annotations

from functools import partial

import torch
from tqdm import tqdm

from mdpo.config import TrainConfig
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import DataError
from mdpo.training.metrics import step_record
from mdpo.training.reference import Reference
from mdpo.training.setup import Run
from mdpo.training.step import DPOObjective, dpo_forward_step, run_schedule


def evaluate_pairs(
    cfg: TrainConfig,
    run: Run,
    objective: DPOObjective,
    policy: list[torch.nn.Module],
    pairs: list[TokenizedPair],
    reference: Reference,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Forward-only DPO metrics of the `policy` (its model chunks) over `pairs` (each DP rank a contiguous share:
    a row's pairs together), reduced over the ranks and returned on every rank as `eval_`-prefixed TRL names; a
    progress bar over this rank's pairs on global rank 0 when `progress`."""
    dp = run.layout.dp
    if len(pairs) < dp:
        raise DataError(f"{cfg.data.eval_file}: fewer eval pairs than data-parallel ranks ({dp})")
    mine = run.share(cfg, pairs, range(len(pairs)))
    step = partial(dpo_forward_step, objective, run.scorer)
    outputs: list[dict] = []
    # The metric sums are added in micro-batch order however the micro-batches are chunked: the same numbers.
    with tqdm(total=len(mine), desc="eval", unit="pair", disable=not (progress and run.is_logger)) as bar:
        for chunk in run.device_chunks(run.microbatches(cfg, pairs, mine)):
            references = reference.logps(chunk, "eval")
            with torch.no_grad():
                found = run_schedule(step, chunk, policy, forward_only=True, references=references)
            outputs += [out for out, mb in zip(found, chunk) if not mb.echo]  # (found: last stage only)
            bar.update(sum(len(mb.pair_ids) for mb in chunk if not mb.echo))
    return step_record([out["sums"] for out in outputs], objective.metric_names, prefix="eval_")
