"""`mdpo` command line: train, precompute-ref, eval, demo, data stats, convert (hf-to-megatron, megatron-to-hf),
plan, sweep and plot. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from mdpo import planner, startup
from mdpo.checkpoint import convert
from mdpo.checkpoint.description import describe_model
from mdpo.config import TrainConfig, load_config, translate_args
from mdpo.data import stats
from mdpo.demo import run_demo
from mdpo.errors import MdpoError
from mdpo.plot import plot_metrics
from mdpo.sweep import run_sweep
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
    run_demo(args.out)
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
            args.hf, args.out, tp=args.tp, pp=args.pp, position_embedding=args.position_embedding, check=check
        )
    else:
        out = convert.megatron_to_hf(args.ckpt, args.out, check=check, adapter=args.adapter)
    print(f"[mdpo] wrote {out}")
    return 0


def cmd_plot(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("plot", extra)
    print(plot_metrics(args.run_dir, args.out))
    return 0


def cmd_plan(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("plan", extra)
    print(planner.run(args))
    return 0


def cmd_sweep(args: argparse.Namespace, extra: Sequence[str]) -> int:
    _no_extra("sweep", extra)
    print(run_sweep(args.sweep))
    return 0


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="after converting, compare mdpo's forward of the Megatron checkpoint with an independent forward of the "
        "HF folder (float32; exit 2 over max |logit error| 1e-4)",
    )
    parser.add_argument(
        "--check-data", help="compare on prompt + chosen of this data file's first pairs (default: generated ids)"
    )
    parser.add_argument("--check-rows", type=int, help="rows to compare (default 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo", description="DPO on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run DPO from a YAML config",
        description="key=value overrides use dotted names (optimizer.lr=1e-6); Megatron-LM style flags such "
        "as --tensor-model-parallel-size 2 are accepted too.",
    )
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.set_defaults(func=cmd_train)
    precompute = sub.add_parser(
        "precompute-ref",
        help="run the reference model once over the data and cache its log-probs (for dpo.reference=precomputed)",
    )
    precompute.add_argument("config", nargs="?", help="YAML config file (the same one training uses)")
    precompute.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    precompute.set_defaults(func=cmd_precompute_ref)
    evaluate = sub.add_parser("eval", help=eval_command.HELP, description=eval_command.DESCRIPTION)
    eval_command.add_arguments(evaluate).set_defaults(func=cmd_eval)
    demo = sub.add_parser("demo", help="a complete DPO run on a built-in task, no download")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.set_defaults(func=cmd_demo)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    data_stats = data.add_parser(
        "stats", help="counts, token-length percentiles, truncation, padding waste and packing efficiency"
    )
    stats.add_arguments(data_stats).set_defaults(func=cmd_data_stats)
    conv = sub.add_parser("convert", help="HF model folder <-> Megatron-Core distributed checkpoint").add_subparsers(
        dest="direction", required=True
    )
    to_mcore = conv.add_parser(
        "hf-to-megatron",
        help="HF folder of a supported family (docs/model-families.md) -> reshardable Megatron checkpoint",
        description="Writes with --tp x --pp processes (each holds its part of the model); the checkpoint loads "
        "at any TP/PP/DP layout. Point model.init_from at the output to train from it.",
    )
    to_mcore.add_argument("--hf", required=True, help="HF model folder (config.json, safetensors or .bin)")
    to_mcore.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with (default 1)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with (default 1)")
    to_mcore.add_argument(
        "--position-embedding",
        choices=("auto", "rope", "alibi"),
        default="auto",
        help="Baichuan 2: auto = RoPE when hidden_size is 4096 (7B), else ALiBi (13B)",
    )
    _check_arguments(to_mcore)
    to_mcore.set_defaults(func=cmd_convert)
    to_hf = conv.add_parser(
        "megatron-to-hf", help="converted or training checkpoint (step_N folder) -> HF folder of the model's family"
    )
    to_hf.add_argument("--ckpt", required=True, help="mdpo convert output or training checkpoint folder")
    to_hf.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_hf.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's checkpoint: write its adapters as a PEFT "
        "folder (default: merged into the base, a full HF folder)",
    )
    _check_arguments(to_hf)
    to_hf.set_defaults(func=cmd_convert)
    plan = sub.add_parser("plan", help="predict per-GPU memory and step time of layouts; rank the feasible ones")
    planner.add_arguments(plan).set_defaults(func=cmd_plan)
    sweep = sub.add_parser(
        "sweep", help="a grid of short runs (sizes x layouts) -> OUT/sweep.csv and sweep.png; reruns resume"
    )
    sweep.add_argument("sweep", help="sweep YAML (config, overrides, grid, nproc, steps, warmup, out)")
    sweep.set_defaults(func=cmd_sweep)
    plot = sub.add_parser("plot", help="draw RUN_DIR/metrics.jsonl as a PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    plot.set_defaults(func=cmd_plot)
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
