"""Preference pairs: local data files -> TokenizedPair (prompt ids, chosen ids + EOS, rejected ids + EOS).

`load_pairs` is the one entry point: it reads the files (`sources`), detects the schema (`formats`), applies the
template (`templates`), tokenizes with an exact prompt/response boundary and applies the length policy
(`encoding`), in parallel through `datasets.map` and with an on-disk cache (`pipeline`). Every skip, drop,
truncation and boundary fix is counted by reason in a `TokenizeReport`, shown to the user before training.
"""

from __future__ import annotations

import array
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mdpo.config import DataConfig, ScheduleConfig
from mdpo.data.encoding import LengthLimits
from mdpo.data.formats import NO_PAIR, ColumnKeys, RankSettings
from mdpo.data.pipeline import Settings, default_cache_dir, tokenized_table
from mdpo.data.sources import resolve_sources, signature
from mdpo.data.templates import FALLBACK_TEMPLATE, ChatOptions
from mdpo.errors import DataError

__all__ = [
    "TokenizeReport",
    "TokenizedPair",
    "load_pairs",
    "settings_from_config",
]


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; the prompt is shared, each response ends with EOS (unless it was truncated).

    `index` is the pair's 0-based position in the tokenized table: one slot per pair a row makes (a single-pair row,
    or a skipped one, takes one: there it is the row's position among all input rows, all files in order). `row` is
    its input row's position (-1 when built without one: its own, `index`) and `turn` its position among that row's
    preference turns (multi_turn rows; 0 otherwise), so that a row's pairs can be found together."""

    index: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    row: int = -1
    turn: int = 0

    def __post_init__(self) -> None:
        if self.row < 0:
            object.__setattr__(self, "row", self.index)


@dataclass
class TokenizeReport:
    """What reading and tokenization changed, counted by reason; shown to the user before training.

    `info` says how the data was read: format, template, rows, cache status (not reasons, not in the summary)."""

    counts: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items())) or "nothing cut or dropped"


def settings_from_config(
    data: DataConfig, fallback_template: str = FALLBACK_TEMPLATE, training_seed: int = ScheduleConfig.seed
) -> Settings:
    limits = LengthLimits(data.max_length, data.max_prompt_length, data.prompt_truncation, data.over_length)
    keys = ColumnKeys(data.prompt_key, data.chosen_key, data.rejected_key)
    # the seed only where it is drawn from, so that another training seed leaves other rules' cached pairs valid
    seed = data.rank_seed(training_seed) if data.rank_pairs == "best_vs_random" else None
    ranking = RankSettings(data.rank_pairs, data.min_score_gap, data.score_key, seed)
    chat = ChatOptions(dict(data.chat_template_kwargs), data.train_empty_think)
    return Settings(data.format, data.template, keys, limits, fallback_template, ranking, chat)


def load_pairs(
    data: DataConfig,
    path: str,
    tokenizer,
    report: TokenizeReport,
    fallback_template: str = FALLBACK_TEMPLATE,
    training_seed: int = ScheduleConfig.seed,
) -> list[TokenizedPair]:
    """Tokenized pairs of a data file or folder, per `data` (format, template, ranking, lengths, on_bad_row, cache);
    `fallback_template` is what `data.template: auto` gives message rows whose tokenizer has no chat template (the
    model family's `default_template`, from a caller that knows the model); `training_seed` (schedule.seed) is
    best_vs_random's seed where data.seed is unset.

    A bad row raises DataError naming ``file:row`` (or, with on_bad_row=skip, is counted in `report`); a DataError
    also when no pair is left. The tokenized set is cached on disk unless data.cache is false."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    sources = resolve_sources(path)
    cache_dir = (data.cache_dir or default_cache_dir()) if data.cache else None
    with tokenized_table(
        sources, settings_from_config(data, fallback_template, training_seed), tokenizer, data.num_proc, cache_dir
    ) as (table, info):
        report.info.update(info)
        pairs = collect(table, [s.path for s in sources], data.on_bad_row, report)
    if not pairs:
        raise DataError(f"{path}: no usable pairs ({report.summary()})")
    return pairs


def collect(table, source_paths: list[str], on_bad_row: str, report: TokenizeReport) -> list[TokenizedPair]:
    """Tokenized rows -> pairs in input order; bad rows raise or are counted (a row left with no pair as dropped),
    dropped pairs are counted."""
    pairs = []
    index, row, last = 0, -1, None
    for batch in table.iter(batch_size=4096):
        for i, error in enumerate(batch["error"]):
            source = (batch["source"][i], batch["row"][i])
            row += source != last
            last = source
            if error:
                where = f"{source_paths[source[0]]}:{source[1]}"
                if on_bad_row != "skip":
                    raise DataError(f"{where}: {error} (set data.on_bad_row=skip to skip such rows)")
                report.counts[f"{'dropped' if error.startswith(NO_PAIR) else 'skipped'}: {error}"] += 1
            report.counts.update(batch["events"][i])
            if batch["prompt"][i]:
                ids = (batch["prompt"][i], batch["chosen"][i], batch["rejected"][i])
                pairs.append(TokenizedPair(index, *ids, row=row, turn=batch["turn"][i]))
            index += 1
    return pairs


def data_fingerprint(path: str, pairs: list[TokenizedPair]) -> dict:
    """What a checkpoint keeps of its training data, to tell a resumed run whether it trains on the same pairs: the
    files (names and sizes, for the message), the number of pairs and a SHA-256 of the pairs as training sees them
    (row index, prompt, chosen and rejected ids): any change of rows, tokenizer, template or lengths shows there; a
    moved or re-touched file does not."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in ([pair.index], pair.prompt, pair.chosen, pair.rejected):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(array.array("i", ids).tobytes())
    files = [(Path(p).name, size) for p, size, _ in signature(resolve_sources(path))]
    return {"files": files, "pairs": len(pairs), "sha256": digest.hexdigest()}
