"""Loading a run's configuration: YAML plus ``key=value`` overrides (or Megatron-LM style flags).

`load_config` reads the file, applies dotted overrides, type-checks every value against the type hints, builds each
section (which checks itself), fills the model description from the folder `model.hf_config` / `model.init_from`
names (through the `describe_model` the caller passes: reading HF and checkpoint folders is not the config's job),
then runs the rules that join sections. Every user error is a one-line ``ConfigError`` naming the dotted key, the
value and where it came from (file path and line, or the override). Checks that need the world size belong to the
launcher (`ParallelConfig.layout(world)`), not here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from mdpo.config.sections import ModelConfig, Section, TrainConfig, validate
from mdpo.errors import ConfigError

DescribeModel = Callable[[dict[str, Any]], ModelConfig]

# Megatron-LM style command-line flags -> dotted config keys.
ARG_ALIASES: dict[str, str] = {
    "--tensor-model-parallel-size": "parallel.tp",
    "--pipeline-model-parallel-size": "parallel.pp",
    "--expert-model-parallel-size": "parallel.ep",
    "--expert-tensor-parallel-size": "parallel.etp",
    "--use-distributed-optimizer": "parallel.distributed_optimizer",
    "--micro-batch-size": "schedule.micro_batch_size",
    "--global-batch-size": "schedule.global_batch_size",
    "--lr": "optimizer.lr",
    "--train-iters": "schedule.train_steps",
    "--exit-interval": "schedule.exit_interval",
    "--exit-duration-in-mins": "schedule.exit_duration_minutes",
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
    """A value that is not of a field's type (the caller names the key)."""


def _coerce(value: object, tp: Any) -> object:
    """Return value as type tp (int widens to float) or raise _Mismatch; bool is never int."""
    for a in _union_args(tp):
        if a is Any:
            return value
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
        if typing.get_origin(a) is dict and isinstance(value, dict):  # a mapping handed on as is (string keys)
            key, item = typing.get_args(a)
            try:
                return {_coerce(k, key): _coerce(v, item) for k, v in value.items()}
            except _Mismatch:
                continue
        if typing.get_origin(a) is list and isinstance(value, list):
            (item,) = typing.get_args(a)
            try:
                return [_coerce(v, item) for v in value]
            except _Mismatch:
                continue
    raise _Mismatch


def coerce_field(cls: type, name: str, value: object) -> object:
    """`value` as the type of field `name` of section `cls`; a ValueError saying what it must be otherwise (for
    values read from elsewhere than the config, e.g. a HF config.json)."""
    tp = _hints(cls)[name]
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise ValueError(f"'{name}' must be {_type_name(tp)}, got {_describe(value)}") from None


def _accepts_str(tp: Any) -> bool:
    return str in _union_args(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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


def _section_fields(cls: type, raw: object, prefix: str, origin: dict[str, str]) -> dict[str, Any]:
    """One section's values from the YAML/override tree, each coerced to its field's type."""
    section = prefix[:-1]
    if raw is None:  # an empty section ("optimizer:") keeps the defaults
        raw = {}
    if not isinstance(raw, dict):
        raise _err(origin.get(section), f"config key '{section}' must be a mapping, got {_describe(raw)}")
    hints = _hints(cls)
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key)
        dotted = f"{prefix}{name}"
        where = origin.get(dotted) or origin.get(section)
        if name not in hints:
            raise _unknown_key(dotted, name, cls, where)
        try:
            fields[name] = _coerce(value, hints[name])
        except _Mismatch:
            raise _err(
                where, f"config key '{dotted}' must be {_type_name(hints[name])}, got {_describe(value)}"
            ) from None
    return fields


def _build(raw: dict[str, Any], origin: dict[str, str], describe_model: DescribeModel | None) -> TrainConfig:
    for key in raw:
        if str(key) not in _hints(TrainConfig):
            raise _unknown_key(str(key), str(key), TrainConfig, origin.get(str(key)))
    sections: dict[str, Section] = {}
    for name, cls in _hints(TrainConfig).items():
        fields = _section_fields(cls, raw.get(name), f"{name}.", origin)
        described = name == "model" and describe_model is not None
        sections[name] = describe_model(fields) if described else cls(**fields)
    return TrainConfig(**sections)


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
        value = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
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


def _read_tree(path: str | os.PathLike[str] | None, overrides: Sequence[str]) -> tuple[dict, dict[str, str]]:
    if isinstance(overrides, str):
        overrides = [overrides]
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        raw, origin = _read_yaml(os.fspath(path))
    for item in overrides:
        _apply_override(raw, item, origin)
    return raw, origin


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, describe_model: DescribeModel | None = None
) -> TrainConfig:
    """Read a YAML config (None = all defaults), apply ``key=value`` overrides, build and validate it.

    `describe_model` turns the model section's values into a ModelConfig filled from the folder `model.hf_config`
    or `model.init_from` names (`mdpo.checkpoint.description.describe_model`); without it those keys are kept as
    given and the model section's own values describe the model."""
    raw, origin = _read_tree(path, overrides)
    cfg = _build(raw, origin, describe_model)
    validate(cfg)
    return cfg


def load_config_tree(
    tree: dict[str, Any],
    origin: dict[str, str],
    overrides: Sequence[str] = (),
    *,
    describe_model: DescribeModel | None = None,
) -> TrainConfig:
    """`load_config` for sections a command derived rather than read from a YAML file (`mdpo eval`: a training
    checkpoint's stored settings and its own flags), then ``key=value`` overrides; `origin` maps dotted keys to
    where each came from, for the error messages."""
    raw = copy.deepcopy(tree)
    origin = dict(origin)
    for item in overrides:
        _apply_override(raw, item, origin)
    cfg = _build(raw, origin, describe_model)
    validate(cfg)
    return cfg


def load_section(path: str | os.PathLike[str], name: str) -> Section:
    """One section of a config file, built and checked on its own (`mdpo data stats` reads only `data`)."""
    raw, origin = _read_tree(path, ())
    cls = _hints(TrainConfig)[name]
    return cls(**_section_fields(cls, raw.get(name), f"{name}.", origin))


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
