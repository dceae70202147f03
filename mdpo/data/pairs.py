"""Preference pairs from JSONL: read, tokenize (prompt tokens masked out), and report what was cut or dropped."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mdpo.errors import DataError


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; the prompt is shared, each response ends with EOS."""

    index: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class TokenizeReport:
    """What tokenization changed, counted by reason; shown to the user before training."""

    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items())) or "nothing cut or dropped"


HH_ASSISTANT = "\n\nAssistant:"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH-RLHF transcripts -> (prompt, chosen, rejected): the prompt is their common prefix up to and including
    the last "\n\nAssistant:" inside it; None when there is no such shared prefix."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _parse_row(line: str, keys: tuple[str, str, str]) -> dict:
    """One JSONL line -> {"prompt", "chosen", "rejected"}; raises ValueError saying what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if keys[0] not in row and all(isinstance(row.get(k), str) for k in keys[1:]):
        split = split_hh(row[keys[1]], row[keys[2]])
        if split is None:
            raise ValueError(f"missing key '{keys[0]}' and no shared HH prompt")
        row = dict(zip(keys, split))
    for key in keys:
        if key not in row:
            raise ValueError(f"missing key '{key}'")
        if not isinstance(row[key], str):
            raise ValueError(f"'{key}' must be a string, got {type(row[key]).__name__}")
    for key in keys[1:]:
        if not row[key].strip():
            raise ValueError(f"'{key}' is empty")
    if row[keys[1]] == row[keys[2]]:
        raise ValueError("chosen and rejected are identical")
    return {"prompt": row[keys[0]], "chosen": row[keys[1]], "rejected": row[keys[2]]}


def read_pairs_jsonl(
    path: str | Path,
    keys: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
    on_bad_row: str = "error",
    report: TokenizeReport | None = None,
) -> list[dict]:
    """Rows with string prompt/chosen/rejected (or HH-RLHF chosen/rejected transcripts without a prompt).

    A bad row is an error naming file:row, or with on_bad_row="skip" a skip counted by reason in `report`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(_parse_row(line, keys))
            except ValueError as err:
                if on_bad_row != "skip":
                    raise DataError(f"{path}:{line_no}: {err} (set data.on_bad_row=skip to skip such rows)") from None
                if report is not None:
                    report.counts[f"skipped: {err}"] += 1
    if not rows:
        raise DataError(f"{path}: no usable rows")
    return rows


def _response_ids(tokenizer, prompt: str, prompt_ids: list[int], response: str, report: TokenizeReport) -> list[int]:
    """Tokenize prompt+response together (as the model will see it) and keep the part after the prompt.

    If the tokenizer merges across the boundary, the prompt ids are no longer a prefix; the response is then
    tokenized on its own, and the fix is counted.
    """
    full = tokenizer(prompt + response, add_special_tokens=True)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids) :]
    else:
        report.counts["boundary re-tokenized"] += 1
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids + [tokenizer.eos_token_id]


def tokenize_pairs(
    rows: list[dict], tokenizer, max_length: int, report: TokenizeReport | None = None
) -> list[TokenizedPair]:
    """Tokenize rows; responses are cut (keeping their start) to fit max_length, prompts that leave no room
    for a response token are dropped. Both are counted in `report`."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    report = report if report is not None else TokenizeReport()
    pairs = []
    for index, row in enumerate(rows):
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        if len(prompt_ids) >= max_length:
            report.counts["dropped: prompt >= max_length"] += 1
            continue
        responses = []
        for key in ("chosen", "rejected"):
            ids = _response_ids(tokenizer, row["prompt"], prompt_ids, row[key], report)
            room = max_length - len(prompt_ids)
            if len(ids) > room:
                report.counts[f"truncated: {key} response"] += 1
                ids = ids[:room]
            responses.append(ids)
        pairs.append(TokenizedPair(index, prompt_ids, responses[0], responses[1]))
    return pairs
