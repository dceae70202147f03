"""`mdpo` command line: train, precompute-ref, eval, demo, data stats, convert (hf-to-megatron, megatron-to-hf),
plan, sweep and plot. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from mdpo import demo, planner, plot, startup, sweep
from mdpo.checkpoint import convert
from mdpo.checkpoint.description import describe_model
from mdpo.config import TrainConfig, load_config, translate_args
from mdpo.data import stats
from mdpo.errors import MdpoError
from mdpo.training import eval_command
from mdpo.training.precompute import precompute_reference
from mdpo.training.trainer import train


def load_run_config(config: str | None, overrides: Sequence[str]) -> TrainConfig:
    """A run's config as `mdpo train` reads it: the YAML file (optional: `mdpo train key=value ...` configures
    everything from overrides), overrides and Megatron-LM style flags, the model described by the folder
    `model.hf_config` / `model.init_from` names."""
    overrides = list(overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]
    return load_config(config, translate_args(overrides), describe_model=describe_model)


def _no_extra(command: str, extra: Sequence[str]) -> None:
    if extra:
        raise MdpoError(f"unexpected arguments for {command}: {' '.join(extra)}")


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = load_run_config(args.config, [*args.overrides, *extra])
    startup.prepare()
    train(cfg)
    return 0


def cmd_precompute_ref(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = load_run_config(args.config, [*args.overrides, *extra])
    startup.prepare()
    precompute_reference(cfg)
    return 0


def cmd_eval(args: argparse.Namespace, extra: Sequence[str]) -> int:
    setup = eval_command.eval_setup(
        args.model, args.data, args.reference, args.reference_free, [*args.overrides, *extra]
    )
    startup.prepare()
    return eval_command.run_eval(setup, args.json)


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("demo", extra)
    startup.prepare()
    demo.run_demo(args.out)
    return 0


def cmd_data_stats(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("data stats", extra)
    startup.quiet_libraries()
    return stats.print_stats(args)


def cmd_convert(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("convert", extra)
    if not args.check and (args.check_data is not None or args.check_rows is not None):
        raise MdpoError("--check-data and --check-rows need --check")
    check = None
    if args.check:
        rows = args.check_rows if args.check_rows is not None else convert.Check.rows
        check = convert.Check(Path(args.check_data) if args.check_data else None, rows)
    if args.direction == "hf-to-megatron":
        out = convert.hf_to_megatron(
            args.hf,
            args.out,
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            position_embedding=args.position_embedding,
            check=check,
        )
    else:
        out = convert.megatron_to_hf(args.ckpt, args.out, check=check, adapter=args.adapter)
    print(f"[mdpo] wrote {out}")
    return 0


def cmd_plot(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("plot", extra)
    print(plot.plot_metrics(args.run_dir, args.out))
    return 0


def cmd_plan(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("plan", extra)
    print(planner.run(args))
    return 0


def cmd_sweep(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("sweep", extra)
    print(sweep.run_sweep(args.sweep))
    return 0


def _run_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A run's config (train, precompute-ref): the YAML file and dotted overrides."""
    parser.add_argument("config", nargs="?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser


def _data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    tools = parser.add_subparsers(dest="data_command", required=True)
    summary = "counts, token-length percentiles, truncation, padding waste and packing efficiency"
    stats.add_arguments(tools.add_parser("stats", help=summary)).set_defaults(func=cmd_data_stats)
    return parser


# (command, help, its arguments (each command's module owns them), what runs it, description)
COMMANDS = (
    (
        "train",
        "run DPO from a YAML config",
        _run_config_arguments,
        cmd_train,
        "key=value overrides use dotted names (optimizer.lr=1e-6); Megatron-LM style flags such as "
        "--tensor-model-parallel-size 2 are accepted too.",
    ),
    (
        "precompute-ref",
        "run the reference model once over the data and cache its log-probs (for dpo.reference=precomputed)",
        _run_config_arguments,
        cmd_precompute_ref,
        None,
    ),
    ("eval", eval_command.HELP, eval_command.add_arguments, cmd_eval, eval_command.DESCRIPTION),
    ("demo", "a complete DPO run on a built-in task, no download", demo.add_arguments, cmd_demo, None),
    ("data", "data tools", _data_arguments, None, None),
    ("convert", "HF model folder <-> Megatron-Core distributed checkpoint", convert.add_arguments, cmd_convert, None),
    (
        "plan",
        "predict per-GPU memory and step time of layouts; rank the feasible ones",
        planner.add_arguments,
        cmd_plan,
        None,
    ),
    (
        "sweep",
        "a grid of short runs (sizes x layouts) -> OUT/sweep.csv and sweep.png; reruns resume",
        sweep.add_arguments,
        cmd_sweep,
        None,
    ),
    ("plot", "draw RUN_DIR/metrics.jsonl as a PNG", plot.add_arguments, cmd_plot, None),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo", description="DPO on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary, add_arguments, run, description in COMMANDS:
        command = add_arguments(sub.add_parser(name, help=summary, description=description))
        if run is not None:
            command.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Every user-facing error is one line, `mdpo: error: ...` (its first line), exit 2; with MDPO_DEBUG=1 its full
    text and traceback follow."""
    args, extra = build_parser().parse_known_args(argv)
    try:
        return args.func(args, extra)
    except MdpoError as err:
        if os.environ.get("RANK", "0") == "0":
            lines = str(err).strip().splitlines() or [type(err).__name__]
            print(f"mdpo: error: {lines[0]}", file=sys.stderr)
            if os.environ.get("MDPO_DEBUG") == "1":
                traceback.print_exc()
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
