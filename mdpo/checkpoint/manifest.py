"""What a training checkpoint holds, written when it is completed and checked before it is loaded: every file's size,
and a SHA-256 of each small one (the DCP metadata, Megatron's common state, mdpo's meta: a few KB to MB, while the
tensor shards are GBs and are checked by size). A truncated or deleted shard, or a damaged metadata file, is then
named before dist_checkpointing fails on it with a traceback, and a resume can fall back to an older checkpoint.
Checkpoints written before manifests existed have none and are not checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mdpo.checkpoint.files import COMPLETE, MANIFEST

CHECKSUM_BYTES = 16 << 20  # files up to this size get a checksum besides their size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """The manifest of every file now in `folder` (subfolders included), the manifest and the marker aside."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE)):
        size = path.stat().st_size
        entry = {"bytes": size, **({"sha256": _sha256(path)} if size <= CHECKSUM_BYTES else {})}
        files[path.relative_to(folder).as_posix()] = entry
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files, naming the file (None: intact, or written before manifests)."""
    file = folder / MANIFEST
    if not file.is_file():
        return None
    try:
        files = json.loads(file.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, {entry['bytes']} were written"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None
