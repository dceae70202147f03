"""What a resumed run may change: the config keys whose change keeps it the run it was (the same pairs in each step,
the same math: where things are written or logged, when to evaluate or save, the layout and kernels, how pairs are
grouped into micro-batches), and the rest, which make it another run (the data, the sampler's seed and batch size,
the model, the objective, the optimizer and its schedule). The data are judged by what training sees, the tokenized
pairs, whose fingerprint a checkpoint keeps, so a moved or re-touched data file is no change and a changed
template or length is."""

from __future__ import annotations

import dataclasses
from typing import Any

from mdpo.config.sections import TrainConfig

# Keys (or "section." prefixes) whose change keeps the run.
KEEPS_THE_RUN = (
    "logging.",
    "checkpoint.",
    "parallel.",
    "schedule.exit_interval",
    "schedule.exit_duration_minutes",
    "schedule.micro_batch_size",
    "model.attention",
    "model.fused_swiglu",
    "model.fused_rope",
    "model.logprob_chunk_tokens",
    "data.eval_file",
    "data.num_proc",
    "data.cache",
    "data.cache_dir",
    "data.packing",
    "data.pack_tokens",
    "data.share_prompt",
)
# ... except these: bf16 and fp32 are other runs
CHANGES_THE_RUN = ("parallel.precision",)
# The data section's other keys decide the tokenized pairs, which are compared themselves (`data_changes`).
JUDGED_BY_THE_PAIRS = "data."


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} of a config dict (`config_to_dict`)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def keeps_the_run(key: str) -> bool:
    return key not in CHANGES_THE_RUN and any(
        key == k or (k.endswith(".") and key.startswith(k)) for k in KEEPS_THE_RUN
    )


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that keep the run, changes that make it another), each "key old -> new", between a checkpoint's
    config and this run's; data keys other than those that keep the run are left to `data_changes`. A key the
    checkpoint's config lacks (it came later) is no change where it holds its default, which does what the
    checkpoint's run did (e.g. `dpo.router_aux_loss_type: auto` where only transformers' loss ran)."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(dataclasses.asdict(TrainConfig()))
    keeping, changing = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or (key not in old and key in defaults and new.get(key) == defaults[key]):
            continue
        change = f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        if keeps_the_run(key):
            keeping.append(change)
        elif not key.startswith(JUDGED_BY_THE_PAIRS):
            changing.append(change)
    return keeping, changing


def data_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """How this run's training pairs differ from the checkpoint's (`data_fingerprint` of each): the files, their
    sizes and the number of pairs named when they differ; [] when the tokenized pairs are the same (or the checkpoint
    predates fingerprints)."""
    if saved is None or saved.get("sha256") == current["sha256"]:
        return []
    described = lambda d: ", ".join(f"{name} ({size} bytes)" for name, size in d["files"])
    changes = []
    if saved["files"] != current["files"]:
        changes.append(f"train files {described(saved)} -> {described(current)}")
    if saved["pairs"] != current["pairs"]:
        changes.append(f"train pairs {saved['pairs']} -> {current['pairs']}")
    return changes or ["the tokenized train pairs (same files and count: other ids, e.g. template, lengths, tokenizer)"]
