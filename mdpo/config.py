"""Training configuration: plain dataclasses, loaded from YAML plus ``key=value`` overrides.

One dataclass per component (torchtitan / Megatron-Core style). ``load_config`` reads the file,
applies dotted overrides, type-checks every value against the type hints, fills the model shape
from a HF ``config.json`` and runs ``validate`` once. Every user error is a one-line ``ConfigError``
naming the dotted key, the value and where it came from (file path and line, or the override).
Checks that need the world size (data-parallel size) belong to the launcher, not here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from mdpo.errors import ConfigError

__all__ = [
    "ARG_ALIASES",
    "CheckpointConfig",
    "DPOConfig",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_hf_config",
    "config_to_dict",
    "load_config",
    "translate_args",
    "validate",
]


@dataclass
class ModelConfig:
    """A HF-config-shaped model description (Llama 2, Qwen 1.0 and Baichuan 2 are all this shape)."""

    hf_config: str | None = None  # HF config.json or model folder; its values fill the fields below
    # Weights to start from: a HF model folder, a `mdpo convert` output or a training checkpoint (step_N folder);
    # None = random init
    init_from: str | None = None
    family: str = "llama"  # llama | qwen | baichuan: the HF format weights are read and exported in
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # the MLP width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (MHA)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # bias on the q/k/v projection (Qwen 1.0)
    position_embedding: str = "auto"  # auto (from config.json, else rope) | rope | alibi (Baichuan 2 13B)
    norm_head: bool = False  # output weight rows L2-normalised in every forward (Baichuan 2's NormHead)
    init_std: float = 0.02  # std of the normal init when init_from is None
    attention: str = "auto"  # auto (TE if present, else SDPA on GPU, local on CPU) | te | sdpa | local


@dataclass
class DataConfig:
    train_file: str = ""  # required: a data file or folder (see format below)
    eval_file: str | None = None
    tokenizer: str = ""  # required: a HF tokenizer folder
    max_length: int = 8192  # tokens per prompt+response sequence
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    on_bad_row: str = "error"  # error | skip (skips are counted and reported)
    # .jsonl/.json(.gz), .parquet, .arrow, a datasets.save_to_disk folder or a folder of such shards
    format: str = "auto"  # auto | ultrafeedback | hh | plain | conversational (auto: from the first row's types)
    template: str = "auto"  # auto | tulu2 | tokenizer | raw | a Jinja chat template (auto: raw for text rows,
    #                         the tokenizer's chat template for message rows, tulu2 if it has none)
    max_prompt_length: int | None = None  # None = only max_length limits the prompt
    prompt_truncation: str = "keep_end"  # keep_end | keep_start: which part of a prompt over max_prompt_length stays
    over_length: str = "truncate"  # truncate | drop: pairs over max_prompt_length / max_length (always counted)
    num_proc: int = 1  # processes for tokenizing (datasets.map)
    cache: bool = True  # reuse the tokenized set from an earlier run when files, tokenizer and settings match
    cache_dir: str | None = None  # None = $MDPO_CACHE_DIR, else $XDG_CACHE_HOME/mdpo/data or ~/.cache/mdpo/data
    packing: bool = False  # pack whole pairs into micro-batches of pack_tokens tokens instead of padding rows
    pack_tokens: int | None = None  # token budget of a pack; None = 2 x max_length (the longest possible pair)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    cp: int = 1  # context-parallel size: each sequence split over cp ranks (long pairs; TE or SDPA attention)
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    sequence_parallel: bool = False  # split norm/residual activations over the TP ranks too (needs tp > 1)
    recompute: str = "none"  # none | selective (core attention) | full (each layer's activations)
    overlap_grad_reduce: bool = False  # overlap the data-parallel gradient reduction with the backward pass
    overlap_param_gather: bool = False  # distributed optimizer: gather updated weights during the next forward
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 (weights/activations, fp32 master) | fp32


@dataclass
class OptimizerConfig:
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 = no clipping
    nonfinite: str = "stop"  # a non-finite loss or grad norm: stop (naming step and pairs) | skip the step
    max_skipped_steps: int = 10  # with nonfinite=skip, stop once this many steps were skipped


@dataclass
class ScheduleConfig:
    global_batch_size: int = 128  # preference pairs per optimizer step
    micro_batch_size: int = 1  # preference pairs per forward/backward
    train_steps: int | None = None  # None = derived from epochs and data size
    epochs: float = 1.0
    warmup_ratio: float = 0.1  # fraction of train_steps spent in linear warmup
    exit_interval: int | None = None  # save and exit after a step divisible by this (Megatron's --exit-interval)
    seed: int = 1234


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (cDPO) label noise, in [0, 0.5)
    loss_type: str | list[str] = "sigmoid"  # a name in mdpo.loss.LOSS_TYPES, or several (weighted sum)
    loss_weights: list[float] | None = None  # one per loss_type; None = all 1.0
    rpo_alpha: float = 0.0  # weight of the chosen responses' mean token NLL (RPO / NeMo sft_loss_weight)
    reference: str = "online"  # online | precomputed (see `mdpo precompute-ref`) | none (reference-free)
    reference_cache: str | None = None  # precomputed reference log-probs; None = RUN_DIR/reference_logps
    bco_delta: float = 0.0  # bco_pair's reward shift
    discopop_tau: float = 0.05  # discopop's temperature


@dataclass
class LoggingConfig:
    run_dir: str = "runs/mdpo"
    log_interval: int = 1  # steps between metric lines
    eval_interval: int | None = None  # steps between held-out evaluations (also before and after training)
    progress: bool = True  # show a progress bar
    plot: bool = True  # write loss/reward plots to run_dir
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard (needs `tensorboard`)
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs `wandb`)
    profile_step: int | None = None  # run this step (1-based) under torch.profiler: RUN_DIR/profile.txt + trace


@dataclass
class CheckpointConfig:
    export_hf: bool = True  # write the trained policy to RUN_DIR/hf as a HF model folder
    dir: str | None = None  # None = RUN_DIR/checkpoints
    save_interval: int | None = None  # steps between checkpoints (None: only at the end and on SIGTERM/SIGINT)
    save_at_end: bool = True
    keep_last: int = 2  # complete checkpoints kept
    resume: str = "auto"  # auto (the latest complete checkpoint in dir, if any) | none | a checkpoint folder


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# Megatron-LM style command-line flags -> dotted config keys.
ARG_ALIASES: dict[str, str] = {
    "--tensor-model-parallel-size": "parallel.tp",
    "--pipeline-model-parallel-size": "parallel.pp",
    "--use-distributed-optimizer": "parallel.distributed_optimizer",
    "--micro-batch-size": "schedule.micro_batch_size",
    "--global-batch-size": "schedule.global_batch_size",
    "--lr": "optimizer.lr",
    "--train-iters": "schedule.train_steps",
    "--seed": "schedule.seed",
    "--seq-length": "data.max_length",
    "--weight-decay": "optimizer.weight_decay",
    "--clip-grad": "optimizer.clip_grad",
    "--adam-beta1": "optimizer.adam_beta1",
    "--adam-beta2": "optimizer.adam_beta2",
    "--adam-eps": "optimizer.adam_eps",
}
_FLAG_ARGS = frozenset({"--use-distributed-optimizer"})  # take no value; present = true

# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` / ``3e4`` as floats (YAML 1.1 wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _yaml_error(where: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    line = f"line {mark.line + 1}: " if mark is not None else ""
    msg = f"{context}, {problem}" if context else problem
    return ConfigError(f"{where}: {line}invalid YAML: {_one_line(msg)}")


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Return (sections, origin) where origin maps dotted keys to 'path: line N'."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: {e.reason}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model, data, ...), got {_describe(data)}")
    origin: dict[str, str] = {}
    _record_lines(path, node, "", origin)
    return data, origin


def _record_lines(path: str, node: yaml.Node, prefix: str, origin: dict[str, str]) -> None:
    """Map each dotted key of a mapping node to its 'path: line N'; reject duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        where = f"{path}: line {key_node.start_mark.line + 1}"
        if key in origin:
            raise ConfigError(f"{where}: duplicate config key '{key}' (first set at {origin[key]})")
        origin[key] = where
        if not prefix:  # sections only: leaf values are not walked
            _record_lines(path, value_node, f"{key}.", origin)


# --------------------------------------------------------------------------- types


def _describe(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in _union_args(tp))


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


class _Mismatch(Exception):
    pass


def _coerce(value: object, tp: Any) -> object:
    """Return value as type tp (int widens to float) or raise _Mismatch; bool is never int."""
    for a in _union_args(tp):
        if a is type(None) and value is None:
            return None
        if a is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if a is int and isinstance(value, int):
            return value
        if a is float and isinstance(value, (int, float)):
            return float(value)
        if a is str and isinstance(value, str):
            return value
        if typing.get_origin(a) is list and isinstance(value, list):
            (item,) = typing.get_args(a)
            try:
                return [_coerce(v, item) for v in value]
            except _Mismatch:
                continue
    raise _Mismatch


def _accepts_str(tp: Any) -> bool:
    return str in _union_args(tp)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _unknown_key(dotted: str, name: str, cls: type, where: str | None) -> ConfigError:
    known = list(_hints(cls))
    parent = dotted[: -len(name)]
    msg = f"unknown config key '{dotted}' (known: {', '.join(known)})"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        msg += f"; did you mean '{parent}{close[0]}'?"
    return ConfigError(f"{where}: {msg}" if where else msg)


def _err(where: str | None, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}" if where else msg)


# --------------------------------------------------------------------------- building


def _build(cls: type, raw: object, prefix: str, origin: dict[str, str]) -> Any:
    section = prefix[:-1]
    if raw is None:  # an empty section ("optimizer:") keeps the defaults
        raw = {}
    if not isinstance(raw, dict):
        raise _err(origin.get(section), f"config key '{section}' must be a mapping, got {_describe(raw)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key)
        dotted = f"{prefix}{name}"
        where = origin.get(dotted) or origin.get(section)
        if name not in hints:
            raise _unknown_key(dotted, name, cls, where)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{dotted}.", origin)
            continue
        try:
            kwargs[name] = _coerce(value, tp)
        except _Mismatch:
            raise _err(where, f"config key '{dotted}' must be {_type_name(tp)}, got {_describe(value)}") from None
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], item: str, origin: dict[str, str]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    where = f"override '{item}'"
    if not sep or not key:
        raise ConfigError(f"malformed override '{item}': expected key=value, e.g. optimizer.lr=1e-5")
    parts = key.split(".")
    cls: type = TrainConfig
    for i, name in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        hints = _hints(cls)
        if name not in hints:
            raise _unknown_key(dotted, name, cls, where)
        tp = hints[name]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                example = next(iter(_hints(tp)))
                raise _err(where, f"config key '{dotted}' is a section; set its keys, e.g. {dotted}.{example}=...")
            cls = tp
        elif not last:
            raise _err(where, f"config key '{dotted}' is {_type_name(tp)}, not a section ('{key}')")
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        if not _accepts_str(tp):
            raise _yaml_error(where, e) from None
        value = text.strip()
    keeps_list = isinstance(value, list) and any(typing.get_origin(a) is list for a in _union_args(tp))
    if _accepts_str(tp) and value is not None and not isinstance(value, str) and not keeps_list:
        value = text.strip()  # e.g. data.tokenizer=2024 or run_dir=on stay strings
    node = raw
    for depth, name in enumerate(parts[:-1]):
        section = ".".join(parts[: depth + 1])
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        elif not isinstance(child, dict):
            raise _err(origin.get(section), f"config key '{section}' must be a mapping, got {_describe(child)}")
        node = child
    node[parts[-1]] = value
    origin[key] = where


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (None = all defaults), apply ``key=value`` overrides and validate."""
    if isinstance(overrides, str):
        overrides = [overrides]
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        raw, origin = _read_yaml(os.fspath(path))
    for item in overrides:
        _apply_override(raw, item, origin)
    cfg = _build(TrainConfig, raw, "", origin)
    apply_hf_config(cfg.model)
    validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain dicts (for writing to the run dir)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- command line


def translate_args(argv: Sequence[str]) -> list[str]:
    """Turn Megatron-LM style flags (``--lr 1e-5``, ``--lr=1e-5``) into ``key=value`` overrides.

    ``key=value`` items pass through unchanged; an unknown ``--flag`` is a ConfigError.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            if "=" not in arg or arg.startswith("="):
                raise ConfigError(
                    f"unexpected argument '{arg}': expected key=value (e.g. optimizer.lr=1e-5) "
                    "or a Megatron-style --flag"
                )
            out.append(arg)
            continue
        flag, sep, value = arg.partition("=")
        if flag not in ARG_ALIASES:
            msg = f"unknown flag '{flag}'"
            close = difflib.get_close_matches(flag, list(ARG_ALIASES), n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
            raise ConfigError(msg + " (or pass section.key=value)")
        if flag in _FLAG_ARGS:
            value = value if sep else "true"
        elif not sep:
            if i >= len(args) or args[i].startswith("--"):
                raise ConfigError(f"flag '{flag}' needs a value")
            value = args[i]
            i += 1
        if value == "":
            raise ConfigError(f"flag '{flag}' needs a value")
        out.append(f"{ARG_ALIASES[flag]}={value}")
    return out


# --------------------------------------------------------------------------- HF config.json


def apply_hf_config(model: ModelConfig) -> None:
    """Fill the model description from ``model.hf_config`` (or ``model.init_from``): a HF config.json (its family
    found from ``architectures``), or the description stored in a ``mdpo convert`` output or training checkpoint.

    A field the user set away from its default must agree with that source. Features the model cannot describe
    (rope scaling, tied embeddings, ...) and unknown architectures are ConfigErrors.
    """
    key, source = "model.hf_config", model.hf_config
    if source is None and model.init_from is not None:
        key, source = "model.init_from", model.init_from
    if source is None:
        return
    from mdpo.checkpoint.convert import stored_model_fields

    stored = stored_model_fields(source)
    if stored is not None:
        file, values = stored
    else:
        file, values = _read_hf_config(key, source)
    hints = _hints(ModelConfig)
    defaults = ModelConfig()
    for name, value in values.items():
        try:
            value = _coerce(value, hints[name])
        except _Mismatch:
            raise ConfigError(
                f"{key}='{source}': {file}: '{name}' must be {_type_name(hints[name])}, got {_describe(value)}"
            ) from None
        current = getattr(model, name)
        if name == "position_embedding" and current != "auto":
            continue  # config.json cannot say (Baichuan 2): the user's explicit choice wins
        if current != getattr(defaults, name) and current != value:
            raise ConfigError(
                f"model.{name}={current!r} conflicts with {name}={value!r} in {file} ({key}); "
                f"drop model.{name} or make them agree"
            )
        setattr(model, name, value)


def _read_hf_config(key: str, source: str) -> tuple[str, dict[str, Any]]:
    """(file, ModelConfig fields) from a HF config.json."""
    from mdpo.models import families

    file = os.path.join(source, "config.json") if os.path.isdir(source) else source
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except OSError as e:
        raise ConfigError(f"{key}='{source}': cannot read '{file}': {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}='{source}': '{file}' is not valid JSON: {_one_line(e)}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{key}='{source}': '{file}' must hold a JSON object, got {_describe(hf)}")
    try:
        family = families.detect(hf)
    except ValueError as e:
        raise ConfigError(f"{key}='{source}': {file}: {e}") from None
    try:
        values = family.read_config(hf)
    except ValueError as e:
        raise ConfigError(f"{key}='{source}': {file}: {e} is not supported by mdpo's {family.name} model") from None
    return file, {"family": family.name, **values}


# --------------------------------------------------------------------------- validation


def validate(cfg: TrainConfig) -> None:
    """Check required keys, ranges and the model/parallel layout; raise the first ConfigError."""
    m, d, p, o, s, dpo, lg = (
        cfg.model,
        cfg.data,
        cfg.parallel,
        cfg.optimizer,
        cfg.schedule,
        cfg.dpo,
        cfg.logging,
    )

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f"{section.name}.{f.name} must be finite, got {value!r}")

    for key, value in (("data.train_file", d.train_file), ("data.tokenizer", d.tokenizer)):
        need(bool(value), f"{key} is required (set it in the config file or pass {key}=...)")

    positive = [
        ("model.vocab_size", m.vocab_size),
        ("model.hidden_size", m.hidden_size),
        ("model.intermediate_size", m.intermediate_size),
        ("model.num_hidden_layers", m.num_hidden_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_key_value_heads", m.num_key_value_heads),
        ("model.rms_norm_eps", m.rms_norm_eps),
        ("model.rope_theta", m.rope_theta),
        ("model.max_position_embeddings", m.max_position_embeddings),
        ("model.init_std", m.init_std),
        ("data.max_length", d.max_length),
        ("schedule.global_batch_size", s.global_batch_size),
        ("schedule.micro_batch_size", s.micro_batch_size),
        ("schedule.train_steps", s.train_steps),
        ("schedule.epochs", s.epochs),
        ("optimizer.lr", o.lr),
        ("optimizer.adam_eps", o.adam_eps),
        ("dpo.beta", dpo.beta),
        ("logging.log_interval", lg.log_interval),
    ]
    for key, value in positive:
        if value is not None:
            need(value > 0, f"{key} must be > 0, got {value!r}")
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp)):
        need(value >= 1, f"{key} must be >= 1, got {value!r}")
    for key, value in (("optimizer.weight_decay", o.weight_decay), ("optimizer.clip_grad", o.clip_grad)):
        need(value >= 0, f"{key} must be >= 0, got {value!r}")
    for key, value in (("optimizer.adam_beta1", o.adam_beta1), ("optimizer.adam_beta2", o.adam_beta2)):
        need(0 <= value < 1, f"{key} must be in [0, 1), got {value!r}")
    need(
        d.on_bad_row in ("error", "skip"),
        f"data.on_bad_row must be 'error' or 'skip', got {d.on_bad_row!r}",
    )
    data_formats = ("auto", "ultrafeedback", "hh", "plain", "conversational")
    need(d.format in data_formats, f"data.format must be one of {', '.join(data_formats)}, got {d.format!r}")
    need(
        d.template in ("auto", "tulu2", "tokenizer", "raw") or "{{" in d.template or "{%" in d.template,
        f"data.template must be auto, tulu2, tokenizer, raw or a Jinja chat template, got {d.template!r}",
    )
    need(
        d.prompt_truncation in ("keep_end", "keep_start"),
        f"data.prompt_truncation must be 'keep_end' or 'keep_start', got {d.prompt_truncation!r}",
    )
    need(d.over_length in ("truncate", "drop"), f"data.over_length must be 'truncate' or 'drop', got {d.over_length!r}")
    need(d.num_proc >= 1, f"data.num_proc must be >= 1, got {d.num_proc!r}")
    if d.max_prompt_length is not None:
        need(
            0 < d.max_prompt_length < d.max_length,
            f"data.max_prompt_length must be in (0, data.max_length={d.max_length}), got {d.max_prompt_length!r}",
        )
    need(
        dpo.reference in ("online", "precomputed", "none"),
        f"dpo.reference must be 'online', 'precomputed' or 'none', got {dpo.reference!r}",
    )
    need(
        dpo.reference != "precomputed" or m.init_from is not None,
        "dpo.reference=precomputed needs model.init_from (the reference checkpoint the cache is stamped with)",
    )
    need(dpo.rpo_alpha >= 0, f"dpo.rpo_alpha must be >= 0, got {dpo.rpo_alpha!r}")
    if lg.eval_interval is not None:
        need(lg.eval_interval > 0, f"logging.eval_interval must be > 0, got {lg.eval_interval!r}")
    if d.pack_tokens is not None:
        need(
            d.pack_tokens >= 2 * d.max_length,
            f"data.pack_tokens={d.pack_tokens} must be >= 2 x data.max_length={2 * d.max_length} "
            "(a pair is two sequences of up to max_length tokens)",
        )
    need(o.nonfinite in ("stop", "skip"), f"optimizer.nonfinite must be 'stop' or 'skip', got {o.nonfinite!r}")
    need(o.max_skipped_steps >= 0, f"optimizer.max_skipped_steps must be >= 0, got {o.max_skipped_steps!r}")
    ck = cfg.checkpoint
    need(ck.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {ck.keep_last!r}")
    if ck.save_interval is not None:
        need(ck.save_interval > 0, f"checkpoint.save_interval must be > 0, got {ck.save_interval!r}")
    need(
        m.attention in ("auto", "te", "sdpa", "local"),
        f"model.attention must be auto, te, sdpa or local, got {m.attention!r}",
    )
    need(
        p.recompute in ("none", "selective", "full"),
        f"parallel.recompute must be none, selective or full, got {p.recompute!r}",
    )
    if cfg.logging.profile_step is not None:
        need(cfg.logging.profile_step >= 1, f"logging.profile_step must be >= 1, got {cfg.logging.profile_step!r}")
    need(p.precision in ("auto", "bf16", "fp32"), f"parallel.precision must be auto, bf16 or fp32, got {p.precision!r}")
    need(p.cp >= 1, f"parallel.cp must be >= 1, got {p.cp!r}")
    if p.cp > 1:
        need(
            not cfg.data.packing,
            "parallel.cp > 1 takes padded micro-batches (data.packing=false): packed rows would have to be split "
            "sequence by sequence",
        )
        need(
            m.position_embedding != "alibi" and m.attention != "local",
            "parallel.cp > 1 needs RoPE and model.attention auto, te or sdpa (Megatron's local attention and "
            "ALiBi have no context parallelism)",
        )
    need(
        not p.overlap_param_gather or p.distributed_optimizer,
        "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true (without it every rank "
        "updates whole weights and there is nothing to gather)",
    )
    need(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
    from mdpo.models.families import FAMILIES

    need(m.family in FAMILIES, f"model.family must be one of {', '.join(FAMILIES)}, got {m.family!r}")
    need(
        m.position_embedding in ("auto", "rope", "alibi"),
        f"model.position_embedding must be auto, rope or alibi, got {m.position_embedding!r}",
    )
    need(
        m.position_embedding != "alibi" or m.attention in ("auto", "sdpa"),
        f"model.position_embedding=alibi needs model.attention=auto or sdpa (ALiBi biases are added to the scores "
        f"of torch SDPA; Megatron's local and Transformer Engine attention here take no ALiBi), got {m.attention!r}",
    )
    need(0 <= s.warmup_ratio < 1, f"schedule.warmup_ratio must be in [0, 1), got {s.warmup_ratio!r}")
    need(0 <= s.seed < 2**32, f"schedule.seed must be in [0, 2**32), got {s.seed!r}")
    need(
        0 <= dpo.label_smoothing < 0.5,
        f"dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing!r}",
    )
    need(
        s.global_batch_size % s.micro_batch_size == 0,
        f"schedule.global_batch_size={s.global_batch_size} is not divisible by "
        f"schedule.micro_batch_size={s.micro_batch_size}",
    )

    heads = m.num_attention_heads
    kv_heads = m.num_key_value_heads if m.num_key_value_heads is not None else heads
    need(
        heads % kv_heads == 0,
        f"model.num_key_value_heads={kv_heads} does not divide model.num_attention_heads={heads}",
    )
    need(
        m.hidden_size % heads == 0,
        f"model.num_attention_heads={heads} does not divide model.hidden_size={m.hidden_size}",
    )
    need(
        m.num_hidden_layers % p.pp == 0,
        f"parallel.pp={p.pp} does not divide model.num_hidden_layers={m.num_hidden_layers}",
    )
    need(heads % p.tp == 0, f"parallel.tp={p.tp} does not divide model.num_attention_heads={heads}")
    need(kv_heads % p.tp == 0, f"parallel.tp={p.tp} does not divide model.num_key_value_heads={kv_heads}")
