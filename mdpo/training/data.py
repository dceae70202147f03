"""The data each rank trains on: tokenized pairs read once per run (rank 0 fills the cache, the others read it),
and a rank's pairs cut into micro-batches for its layout."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from mdpo.config import DataConfig, Layout, ScheduleConfig
from mdpo.data.batching import (
    MicroBatch,
    collate,
    collate_packed,
    collate_shared,
    context_parallel_share,
    pack_microbatches,
    ranking_units,
    split_groups,
    unit_start,
)
from mdpo.data.pairs import TokenizedPair, TokenizeReport, load_pairs
from mdpo.data.templates import FALLBACK_TEMPLATE
from mdpo.errors import DataError, MdpoError
from mdpo.training.console import log


def load_pairs_on_ranks(
    data: DataConfig,
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    what: str,
    fallback_template: str = FALLBACK_TEMPLATE,  # the model family's default_template (data.load_pairs)
    *,
    training_seed: int,  # schedule.seed: best_vs_random's where data.seed is unset (data.load_pairs)
) -> list[TokenizedPair]:
    """Rank 0 tokenizes (and fills the data cache) first; the other ranks then read the cache. A data error on
    rank 0 is raised on every rank, so no rank waits forever at the broadcast; it names the key (`what` is "train"
    or "eval": data.train_file or data.eval_file) as well as the file."""
    report = TokenizeReport()
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            pairs = load_pairs(data, path, tokenizer, report, fallback_template, training_seed)
        except MdpoError as err:
            error = f"data.{what}_file: {err}"
    message = [error]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise DataError(message[0])
    if torch.distributed.get_rank() != 0:
        pairs = load_pairs(data, path, tokenizer, report, fallback_template, training_seed)
    log(f"{what}: {len(pairs)} pairs from {report.info['rows']} rows of {path} ({report.summary()})")
    return pairs


def make_microbatches(
    data: DataConfig,
    schedule: ScheduleConfig,
    layout: Layout,
    pairs: list[TokenizedPair],
    indices: list[int],
    pad_id: int,
    cp_rank: int = 0,
    share_prompt: bool = False,
    at_least: int = 0,
    whole_rankings: bool = False,
) -> list[MicroBatch]:
    """Micro-batches of the given pairs: packs (data.packing) or groups of micro_batch_size padded pairs, each as
    long as the layout needs (`Layout.sequence_multiple`), each pair's prompt once when `share_prompt`; with
    context parallelism (never with a shared prompt) this CP rank keeps its two chunks of every row. At least
    `Layout.min_microbatches` and `at_least` of them where there are that many pairs. With `whole_rankings`
    (plackett_luce) no micro-batch cuts a ranking (`ranking_units`): a group ends at the first ranking's end past
    micro_batch_size pairs."""
    count = max(layout.min_microbatches, at_least)
    units = (lambda group: ranking_units([pairs[i] for i in group])) if whole_rankings else None
    if data.packing:
        budget = data.pack_budget
        packs = pack_microbatches(pairs, indices, budget, share_prompt, whole_rankings)
        return [
            collate_packed([pairs[i] for i in g], pad_id, budget, layout.pack_multiple, share_prompt)
            for g in split_groups(packs, count, units)
        ]
    mbs = schedule.micro_batch_size
    build = collate_shared if share_prompt else collate
    found = units(indices) if units is not None else None
    cuts = sorted({unit_start(found, k) for k in range(0, len(indices), mbs)} | {len(indices)})
    groups = split_groups([list(indices[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a], count, units)
    batches = (build([pairs[i] for i in g], pad_id, layout.sequence_multiple) for g in groups)
    return [context_parallel_share(batch, layout.cp, cp_rank) for batch in batches]
