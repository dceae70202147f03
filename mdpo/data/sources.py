"""Local data files -> `datasets.Dataset`s of raw rows, each row numbered for ``file:row`` messages.

Accepted: ``.jsonl`` / ``.json`` (JSON lines, or one JSON array), optionally ``.gz``; ``.parquet``; ``.arrow``;
a ``datasets.save_to_disk`` folder (a DatasetDict gives its "train" split, or its only one); a folder of such
files (shards, read in sorted name order; hidden entries are ignored). Nothing is fetched from the hub.

JSON lines are read line by line rather than by the `datasets` JSON builder: a malformed line, or a row whose
types differ from the others, must become a bad row at ``file:line``, not a failed Arrow schema for the whole file.
Each line is kept as text (column ``__json``) and parsed in the worker processes of the tokenizing `map`.
Row numbers are line numbers for JSON lines, and 1-based row positions for arrays, Parquet and Arrow.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.feather
import pyarrow.parquet

from mdpo.errors import DataError

JSON_COLUMN = "__json"
ROW_COLUMN = "__row"
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Source:
    """One readable unit: a file, or a datasets folder (kind 'json' | 'parquet' | 'arrow' | 'saved')."""

    path: str
    kind: str


def resolve_sources(path: str | os.PathLike) -> list[Source]:
    """The sources behind a data path, in a fixed order; a DataError when there are none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_file():
        return [Source(str(path), _kind(path))]
    if any((path / marker).is_file() for marker in _SAVED_MARKERS):
        return [Source(str(path), "saved")]
    shards = []
    for child in sorted(path.iterdir()):
        if child.name.startswith((".", "_")):
            continue
        if child.is_dir() and any((child / marker).is_file() for marker in _SAVED_MARKERS):
            shards.append(Source(str(child), "saved"))
        elif child.is_file() and child.name.endswith(JSON_SUFFIXES + TABLE_SUFFIXES):
            shards.append(Source(str(child), _kind(child)))
    if not shards:
        raise DataError(f"{path}: no data files in folder (expected {', '.join(JSON_SUFFIXES + TABLE_SUFFIXES)})")
    return shards


def _kind(path: Path) -> str:
    name = path.name
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(TABLE_SUFFIXES):
        return name.rsplit(".", 1)[1]
    raise DataError(
        f"{path}: unsupported data file (expected {', '.join(JSON_SUFFIXES + TABLE_SUFFIXES)}, "
        "a datasets folder or a folder of such files)"
    )


def signature(sources: list[Source]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file behind the sources: a changed file changes the cache key."""
    files = []
    for source in sources:
        root = Path(source.path)
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in paths:
            stat = p.stat()
            files.append((str(p.resolve()), stat.st_size, stat.st_mtime_ns))
    return files


def read_source(source: Source, work_dir: str, fingerprint: str):
    """The raw rows of one source as a Dataset with a row-number column (JSON: the line text in `__json`)."""
    if source.kind == "json":
        features = datasets.Features({ROW_COLUMN: datasets.Value("int64"), JSON_COLUMN: datasets.Value("string")})
        if next(_json_rows(source.path), None) is None:  # datasets' generator builder refuses to build no rows
            return datasets.Dataset.from_dict({ROW_COLUMN: [], JSON_COLUMN: []}, features=features)
        try:
            return datasets.Dataset.from_generator(
                _json_rows, features, work_dir, gen_kwargs={"path": source.path}, fingerprint=fingerprint
            )
        except datasets.exceptions.DatasetGenerationError as err:  # the generator's own DataError, unwrapped
            if isinstance(err.__cause__, DataError):
                raise err.__cause__ from None
            raise
    try:
        if source.kind == "parquet" and not pyarrow.parquet.ParquetFile(source.path).metadata.num_rows:
            table = datasets.Dataset(pyarrow.parquet.read_table(source.path))  # the builder refuses no rows
        elif source.kind == "parquet":
            table = datasets.Dataset.from_parquet(source.path, cache_dir=work_dir)
        elif source.kind == "arrow":
            table = _read_arrow(source.path)
        else:
            table = _read_saved(source.path)
    except DataError:
        raise
    except Exception as err:  # pyarrow / datasets errors: name the file, keep one line
        raise DataError(f"{source.path}: cannot be read ({' '.join(str(err).split())[:300]})") from None
    return table.add_column(ROW_COLUMN, list(range(1, len(table) + 1)))


def _read_arrow(path: str):

    try:
        return datasets.Dataset.from_file(path)  # the streaming format datasets writes
    except pa.ArrowInvalid:
        return datasets.Dataset(pyarrow.feather.read_table(path))  # the Arrow IPC file format


def _read_saved(path: str):
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(loaded)} and no 'train'; save one split")
    return loaded


def _open_text(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115 - caller closes


def _json_rows(path: str) -> Iterator[dict]:
    """Rows of a JSON file: each non-blank line of JSON lines, or each element of a top-level array."""
    with _open_text(path) as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith(b"["):
            yield from _json_array(path, handle.read())
            return
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not UTF-8 text") from None
            if text.strip():
                yield {ROW_COLUMN: line_no, JSON_COLUMN: text}


def _json_array(path: str, data: bytes) -> Iterator[dict]:
    try:
        rows = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: malformed JSON array ({err})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected JSON lines or a JSON array of rows")
    for i, row in enumerate(rows, start=1):
        yield {ROW_COLUMN: i, JSON_COLUMN: json.dumps(row, ensure_ascii=False)}
