"""`mdpo eval`: the DPO metrics of a held-out preference file for a model folder, as training logs them.

The model is a HF folder, a `mdpo convert hf-to-megatron` output or a training checkpoint (`RUN/checkpoints/
step_N`), loaded at any TP/PP/DP layout (torchrun and the usual `parallel.*` overrides, as for `mdpo train`). The
numbers come from `evaluation.evaluate_pairs`, the function `Trainer.evaluate` runs, so they are the run's own
`eval_*` metrics for that file and model. A training checkpoint brings its run's data, template, `dpo`, precision
and micro-batch settings, bco_pair's running reward mean and, as its default reference, the model its run started
from (training's online reference); any other folder starts from the defaults and needs `--reference` or
`--reference-free`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdpo import parallel
from mdpo.checkpoint.description import arch_fields, describe_model
from mdpo.checkpoint.dist import saved_common_state
from mdpo.checkpoint.files import COMPLETE, TRAINING_META
from mdpo.config import DataConfig, DPOConfig, TrainConfig, load_config_tree, translate_args
from mdpo.errors import ConfigError, MdpoError
from mdpo.models import families
from mdpo.training.data import load_pairs_on_ranks
from mdpo.training.evaluation import evaluate_pairs
from mdpo.training.reference import build_reference
from mdpo.training.setup import build_model, frozen, start_run
from mdpo.training.step import DPOObjective

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# What a training checkpoint's stored config lends the evaluation besides its data and dpo sections: the settings
# that change the numbers (how log-probs are computed, the precision, how pairs are grouped into micro-batches).
_RUN_SETTINGS = {
    "model": ("attention", "logprob_chunk_tokens"),
    "parallel": ("precision",),
    "schedule": ("micro_batch_size",),
}
# Not lent: the files (the command's own), how the run got its reference (eval runs it or none), TR-DPO's moving
# of the reference (eval trains nothing).
_NOT_FROM_RUN = {"data": ("train_file", "eval_file"), "dpo": ("reference", "reference_cache", "sync_ref_model")}

HELP = "DPO metrics (reward accuracy, margins, log-probs, loss) of a preference file for a model folder"
DESCRIPTION = (
    "Prints the eval_* metrics training logs (TRL's names) for --data: a table, or one JSON object with --json. "
    "Runs under torchrun like `mdpo train`; the layout comes from parallel.* overrides. The reference: --reference "
    "FOLDER; by default, for a training checkpoint, the model its run started from (training's online reference; "
    "none when the run was reference-free); any other folder needs --reference FOLDER or --reference-free "
    "(policy log-probs against zeros, as dpo.reference=none). A training checkpoint also brings its run's data, "
    "template, dpo and precision settings; key=value overrides (data.*, dpo.*, parallel.*, schedule.micro_batch_size) "
    "win over them. The tokenizer: the run's, else the model folder's own, else data.tokenizer=FOLDER."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="HF folder, `mdpo convert` output or training checkpoint")
    parser.add_argument("--data", required=True, help="preference data file or folder (any format mdpo trains on)")
    parser.add_argument("--reference", help="reference model folder (default: a training checkpoint's starting model)")
    parser.add_argument("--reference-free", action="store_true", help="no reference: log-ratios against zero")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the metrics on stdout")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (data.max_length=512, parallel.tp=2)")
    return parser


@dataclass(frozen=True)
class EvalSetup:
    """What `mdpo eval` runs: the checked config (the model as `model.init_from`, the file as `data.eval_file`),
    the reference folder (None: reference-free) and a checkpoint's objective state (bco_pair's running mean)."""

    cfg: TrainConfig
    reference: str | None
    reward_mean: dict[str, Any] | None = None


def _known(section: type, values: dict[str, Any], leave_out: Sequence[str] = ()) -> dict[str, Any]:
    """A stored section's values this version still has (an older checkpoint may carry keys since removed)."""
    names = {f.name for f in dataclasses.fields(section)}
    return {k: v for k, v in values.items() if k in names and k not in leave_out}


def _stored_run(folder: Path) -> dict[str, Any] | None:
    """What a training checkpoint stored besides its weights: config, step, ... (None for any other folder)."""
    meta = folder / TRAINING_META
    return json.loads(meta.read_text()) if meta.is_file() else None


def _lent_settings(stored: dict[str, Any], meta: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The sections a training checkpoint's stored config lends the evaluation, and where each key came from."""
    tree = {
        "data": _known(DataConfig, stored["data"], _NOT_FROM_RUN["data"]),
        "dpo": _known(DPOConfig, stored["dpo"], _NOT_FROM_RUN["dpo"]),
    }
    for section, names in _RUN_SETTINGS.items():
        tree[section] = {name: stored[section][name] for name in names if name in stored[section]}
    return tree, {f"{section}.{key}": meta for section, values in tree.items() for key in values}


def _micro_batch_size(tree: dict[str, dict[str, Any]], overrides: Sequence[str]) -> int:
    size = tree.get("schedule", {}).get("micro_batch_size", 1)
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "schedule.micro_batch_size" and value.strip().isdigit():
            size = int(value)
    return size


def _check_paths(model: str, data: str, reference: str | None, reference_free: bool) -> None:
    if not Path(model).is_dir():
        raise MdpoError(f"--model {model}: no such model folder")
    if not Path(data).exists():
        raise MdpoError(f"--data {data}: no such data file or folder")
    if reference is not None and reference_free:
        raise MdpoError("--reference and --reference-free exclude each other")
    if reference is not None and not Path(reference).is_dir():
        raise MdpoError(f"--reference {reference}: no such model folder")


def _run_tree(folder: Path, reference: str | None, reference_free: bool):
    """What a training checkpoint lends the evaluation: its settings (and their origins), the reference its run
    started from (None: random init or reference-free), whether it ran reference-free, and its objective's state
    (bco_pair's running mean: a component of the checkpoint, or in the meta of older ones)."""
    saved = _stored_run(folder)
    if saved is None:
        return {}, {}, None, False, None
    meta = str(folder / TRAINING_META)
    stored = saved["config"]
    tree, origin = _lent_settings(stored, meta)
    run_reference_free = stored["dpo"].get("reference") == "none"
    recorded = None if run_reference_free else stored["model"].get("init_from")
    if stored["dpo"].get("sync_ref_model") and reference is None and not reference_free:
        raise MdpoError(
            f"{meta}: the run's reference moved toward the policy (dpo.sync_ref_model, TR-DPO), so "
            "its starting model is not the reference it ended with: pass --reference FOLDER or "
            "--reference-free"
        )
    objective = saved_common_state(folder, "objective") if (folder / COMPLETE).is_file() else None
    return tree, origin, recorded, run_reference_free, objective or saved.get("reward_mean")


def eval_setup(
    model: str, data: str, reference: str | None, reference_free: bool, overrides: Sequence[str]
) -> EvalSetup:
    """The config and reference `mdpo eval` runs with; every bad input here is one MdpoError line."""
    _check_paths(model, data, reference, reference_free)
    folder, overrides = Path(model), translate_args(overrides)
    tree, origin, recorded, run_reference_free, reward_mean = _run_tree(folder, reference, reference_free)
    # The config requires a train file: the data again (`mdpo eval` reads only data.eval_file).
    tree.setdefault("data", {}).update(train_file=data, eval_file=data)
    tree["model"] = {**tree.get("model", {}), "init_from": model}
    origin.update({"model.init_from": "--model", "data.train_file": "--data", "data.eval_file": "--data"})
    if "tokenizer" not in tree["data"] and not any(o.partition("=")[0].strip() == "data.tokenizer" for o in overrides):
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise MdpoError(f"--model {model} holds no tokenizer files: pass data.tokenizer=FOLDER")
        tree["data"]["tokenizer"] = model
    free = reference_free or (reference is None and run_reference_free)
    tree.setdefault("dpo", {})["reference"] = "none" if free else "online"
    origin["dpo.reference"] = "--reference-free" if reference_free else "--reference"
    # One micro-batch per DP rank divides this global batch: the training-batch rule has no say here.
    world = int(os.environ.get("WORLD_SIZE", 1))
    tree.setdefault("schedule", {})["global_batch_size"] = _micro_batch_size(tree, overrides) * world
    cfg = load_config_tree(tree, origin, overrides, describe_model=describe_model)
    if cfg.dpo.reference == "precomputed":
        raise ConfigError(
            "mdpo eval runs the reference model (--reference) or none (--reference-free), not dpo.reference=precomputed"
        )
    if cfg.dpo.reference == "none":
        return EvalSetup(cfg, None, reward_mean)
    return EvalSetup(cfg, _reference_folder(cfg, folder, reference, recorded), reward_mean)


def _reference_folder(cfg: TrainConfig, folder: Path, reference: str | None, recorded: str | None) -> str:
    """--reference, else the model the checkpoint's run started from; of the same architecture as the model."""
    if reference is None and recorded is not None and not Path(recorded).is_dir():
        raise MdpoError(
            f"the reference recorded in {folder / TRAINING_META} (model.init_from={recorded}) is not a folder here: "
            "pass --reference FOLDER or --reference-free"
        )
    reference = reference or recorded
    if reference is None:
        raise MdpoError(
            f"--model {folder}: no reference model recorded (a training checkpoint records the model its run "
            "started from, unless it started from a random init): pass --reference FOLDER or --reference-free"
        )
    _check_same_model(cfg, str(folder), reference)
    return reference


def _check_same_model(cfg: TrainConfig, model: str, reference: str) -> None:
    """Policy and reference are scored with one layout and one output-layer setting: the same architecture."""
    try:
        described = describe_model({"init_from": reference})
    except ConfigError as err:
        raise ConfigError(f"--reference {reference}: {err}") from None
    ours, theirs = arch_fields(cfg.model), arch_fields(described)
    differ = [name for name in ours if ours[name] != theirs[name]]
    if differ:
        name = differ[0]
        raise MdpoError(
            f"--reference {reference} is another architecture than --model {model} ({name}: "
            f"{theirs[name]!r} vs {ours[name]!r}); mdpo eval scores both with one layout"
        )


def evaluate_model(setup: EvalSetup, progress: bool = True) -> dict[str, float]:
    """Start the layout's processes, load the pairs, the policy and the reference, and evaluate (every rank
    returns the metrics)."""
    cfg = setup.cfg
    try:
        run = start_run(cfg)
        template = families.get(cfg.model.family).default_template
        pairs = load_pairs_on_ranks(
            cfg.data, cfg.data.eval_file, run.tokenizer, "eval", template, training_seed=cfg.schedule.seed
        )
        turns = 1 + max(p.turn for p in pairs)  # multi-turn data: reward accuracy per turn position
        objective = DPOObjective.from_config(cfg.dpo, cfg.model.vocab_size, run.experts, turns)
        if setup.reward_mean is not None:
            objective.reward_mean.load_state_dict(setup.reward_mean)
        policy = frozen(build_model(cfg, run.layout, run.dtype, load=True, experts=run.experts))
        reference = build_reference(cfg, run, weights_from=setup.reference)  # reference-free: dpo.reference=none
        return evaluate_pairs(cfg, run, objective, policy, pairs, reference, progress=progress)
    finally:
        parallel.stop()


def format_table(setup: EvalSetup, metrics: dict[str, float]) -> str:
    """The metrics as two aligned columns under a line naming the model, the reference and the file."""
    cfg = setup.cfg
    reference = setup.reference or "none (reference-free)"
    width = max(len(name) for name in metrics)
    lines = [f"model {cfg.model.init_from}, reference {reference}, data {cfg.data.eval_file}"]
    lines += [f"{name:<{width}}  {value:.6g}" for name, value in metrics.items()]
    return "\n".join(lines)


def run_eval(setup: EvalSetup, as_json: bool) -> int:
    """`mdpo eval`'s output from global rank 0: a table, or (as_json) one JSON object and nothing else on stdout
    (the run's log lines go to stderr then)."""
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with quiet:
        metrics = evaluate_model(setup, progress=setup.cfg.logging.progress)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics) if as_json else format_table(setup, metrics), flush=True)
    return 0
