"""Sources -> one tokenized `datasets.Dataset` (a row per pair), built with `map` and cached on disk.

Each input row becomes one output row per pair it makes (one for single-pair formats; several for ranked rows and
multi-turn rows): its source and row number, the pair's ``turn`` (its position among the row's preference turns), the
prompt/chosen/rejected ids, the reason the row cannot be used (``error``: then it is one output row without ids) and
what the ranking rule and the length policy did (``events``; the row's own on its first pair). Bad rows are kept in
the table, so that ``on_bad_row`` is applied when reading it and does not change the cache.

The cache lives in ``data.cache_dir`` (default ``$MDPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/mdpo/data``, else
``~/.cache/mdpo/data``: data folders are often read-only or shared, and a run folder changes from run to run).
One sub-folder per key; the key hashes the data files (path, size, mtime), the tokenizer (its files' contents, its
class, its special tokens, its chat template and its ids for a probe text), the format, template, column names and
length settings, and the versions of this code and of `transformers`/`tokenizers`. A folder is written under a
temporary name and renamed into place, so concurrent writers (several ranks) never see half a cache. Delete the
folder to clear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import tokenizers
import transformers

from mdpo.data.encoding import Encoded, LengthLimits, encode_batch, fit_lengths, special_prefix
from mdpo.data.formats import ColumnKeys, RankSettings, RowError, detect_format, expand
from mdpo.data.sources import JSON_COLUMN, ROW_COLUMN, Source, read_source, signature
from mdpo.data.templates import (
    FALLBACK_TEMPLATE,
    TEMPLATES,
    ChatOptions,
    Rendered,
    owns_special_tokens,
    render,
    resolve_template,
)
from mdpo.errors import DataError

CACHE_VERSION = 2  # 2: a row per pair, with its turn
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_PROBE = "Hello world <|user|>\n 12 </s>\n\n  <s>x"


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the tokenized rows, as configured (format and template may be 'auto')."""

    fmt: str = "auto"
    template: str = "auto"
    keys: ColumnKeys = ColumnKeys()
    limits: LengthLimits = LengthLimits()
    fallback_template: str = FALLBACK_TEMPLATE  # what `auto` gives message rows without a chat template
    ranking: RankSettings = RankSettings()
    chat: ChatOptions = ChatOptions()


def default_cache_dir() -> Path:
    if os.environ.get("MDPO_CACHE_DIR"):
        return Path(os.environ["MDPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mdpo" / "data"


@contextlib.contextmanager
def tokenized_table(
    sources: list[Source], settings: Settings, tokenizer, num_proc: int = 1, cache_dir: str | Path | None = None
) -> Iterator[tuple[object, dict]]:
    """Yield (Dataset of tokenized rows, info); from the cache when its key matches, else built (and stored when
    `cache_dir` is given). The table is only valid inside the `with` block when there is no cache."""
    key = cache_key(sources, settings, tokenizer)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="mdpo-data-") as work:
            table, info = build_table(sources, settings, tokenizer, num_proc, work, key)
            yield table, {**info, "cache": "off"}
        return
    final = Path(cache_dir) / key
    if not (final / "mdpo_info.json").is_file():
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            work = tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=final.parent)
        except OSError as err:  # an unwritable cache must not stop training
            with tempfile.TemporaryDirectory(prefix="mdpo-data-") as work:
                table, info = build_table(sources, settings, tokenizer, num_proc, work, key)
                yield table, {**info, "cache": f"not written ({err.strerror or err})"}
            return
        try:
            table, info = build_table(sources, settings, tokenizer, num_proc, work, key)
            table.save_to_disk(os.path.join(work, "table"))
            Path(work, "table", "mdpo_info.json").write_text(json.dumps(info, indent=1))
            with contextlib.suppress(OSError):  # another process may have won the race: its copy is as good
                os.replace(os.path.join(work, "table"), final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        status = "written"
    else:
        status = "hit"
    info = json.loads((final / "mdpo_info.json").read_text())
    yield datasets.load_from_disk(str(final)), {**info, "cache": status, "cache_path": str(final)}


def build_table(sources: list[Source], settings: Settings, tokenizer, num_proc: int, work: str, key: str):
    """Read, validate, template and tokenize every source with `map`; returns (Dataset, info)."""
    raws = [read_source(source, work, f"{key}-raw-{i}") for i, source in enumerate(sources)]
    if not any(len(raw) for raw in raws):
        if len(sources) == 1:
            raise DataError(f"{sources[0].path}: no rows (an empty data file)")
        raise DataError(f"{Path(sources[0].path).parent}: no rows in its {len(sources)} data files")
    fmt = settings.fmt if settings.fmt != "auto" else _detect(raws, settings.keys)
    template = resolve_template(settings.template, fmt, tokenizer, settings.fallback_template)
    prefix = [] if owns_special_tokens(template) else special_prefix(tokenizer, bos=template == "tulu3")
    tables = []
    for i, (source, raw) in enumerate(zip(sources, raws)):
        kwargs = dict(source=i, fmt=fmt, template=template, keys=settings.keys, limits=settings.limits)
        kwargs.update(ranking=settings.ranking, chat=settings.chat)
        tables.append(
            raw.map(
                process_batch,
                batched=True,
                batch_size=256,
                remove_columns=raw.column_names,
                fn_kwargs={**kwargs, "tokenizer": tokenizer, "prefix": prefix},
                num_proc=num_proc if num_proc > 1 and len(raw) >= 2 * num_proc else None,
                features=output_features(),
                cache_file_name=os.path.join(work, f"tokenized-{i}.arrow"),
                new_fingerprint=f"{key}-tokenized-{i}",
                desc=f"mdpo: tokenizing {Path(source.path).name}",
            )
        )
    table = datasets.concatenate_datasets(tables) if len(tables) > 1 else tables[0]
    template_name = template if template in TEMPLATES else "jinja"
    rows = sum(len(raw) for raw in raws)
    return table, {"format": fmt, "template": template_name, "rows": rows, "bos_prefix": prefix}


def output_features():
    """The tokenized table's schema (fixed, so that a batch of only bad rows has the same types)."""
    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "source": datasets.Value("int32"),
            "row": datasets.Value("int64"),
            "turn": datasets.Value("int32"),
            "prompt": ids,
            "chosen": ids,
            "rejected": ids,
            "error": datasets.Value("string"),
            "events": datasets.List(datasets.Value("string")),
        }
    )


def _detect(raws: list, keys: ColumnKeys) -> str:
    """The format of the first readable row of the first source that has one ('plain' if none is readable)."""
    for raw in raws:
        for batch in raw.iter(batch_size=64):
            for row in _rows(batch):
                if isinstance(row, dict):
                    return detect_format(row, keys)
    return "plain"


def _rows(batch: dict[str, list]) -> list[dict | RowError]:
    """Rows of a map batch as dicts (JSON text parsed here, in the worker); unparsable rows as RowError."""
    if JSON_COLUMN in batch:
        return [_parse_json(text) for text in batch[JSON_COLUMN]]
    columns = [c for c in batch if c != ROW_COLUMN]
    return [{c: batch[c][i] for c in columns} for i in range(len(batch[ROW_COLUMN]))]


def _parse_json(text: str) -> dict | RowError:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return RowError(f"malformed JSON ({err.msg})")
    if not isinstance(row, dict):
        return RowError(f"expected a JSON object, got {type(row).__name__}")
    return row


def process_batch(
    batch: dict[str, list],
    *,
    source: int,
    fmt: str,
    template: str,
    keys: ColumnKeys,
    limits: LengthLimits,
    ranking: RankSettings,
    chat: ChatOptions,
    tokenizer,
    prefix: list[int],
) -> dict[str, list]:
    """The `map` function: raw rows -> tokenized pairs (ids, error reason, events), in row order and, within a row,
    in its pairs' order; a bad row is one output row with its error."""
    out: dict[str, list] = {name: [] for name in output_features()}
    rendered: list[Rendered] = []
    for row_number, row in zip(batch[ROW_COLUMN], _rows(batch)):
        try:
            if isinstance(row, RowError):
                raise row
            examples, events = expand(row, fmt, keys, ranking)
            pairs = [render(example, template, tokenizer, chat) for example in examples]
            turns, error = [example.turn for example in examples], ""
        except RowError as err:
            pairs, turns, events, error = [], [0], [], str(err)
        rendered += pairs
        for k, turn in enumerate(turns):
            out["source"].append(source)
            out["row"].append(row_number)
            out["turn"].append(turn)
            out["error"].append(error)
            out["events"].append(events if k == 0 else [])
    encoded = iter(encode_batch(tokenizer, prefix, rendered))
    for i, error in enumerate(out["error"]):
        pair = Encoded(error=error) if error else next(encoded)
        if not pair.error:
            pair = fit_lengths(pair, limits, keep_head=len(prefix))
        out["prompt"].append(pair.prompt)
        out["chosen"].append(pair.chosen)
        out["rejected"].append(pair.rejected)
        out["error"][i] = pair.error
        out["events"][i] = out["events"][i] + pair.events
    return out


def cache_key(sources: list[Source], settings: Settings, tokenizer) -> str:
    parts = {
        "version": CACHE_VERSION,
        "files": signature(sources),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(settings),
        "libraries": [transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: the tokenizer's files (not model weights), class, special tokens, chat template,
    and its ids for a probe text (catches options given at load time, such as add_bos_token)."""
    digest = hashlib.sha256()
    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    runtime = [
        type(tokenizer).__name__,
        len(tokenizer),
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.eos_token_id,
        getattr(tokenizer, "chat_template", None),
        tokenizer(_PROBE)["input_ids"],
        tokenizer(_PROBE, add_special_tokens=False)["input_ids"],
    ]
    digest.update(json.dumps(runtime, default=str).encode())
    return digest.hexdigest()
