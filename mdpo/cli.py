"""`mdpo` command line: train, demo, plot. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from mdpo.errors import MdpoError


def quiet_libraries() -> None:
    """Megatron-Core warns at import that TE/Apex are absent; that is expected on CPU and says nothing new."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _start() -> None:
    quiet_libraries()
    from mdpo import megatron_cpu

    megatron_cpu.apply()


def _config_and_overrides(args: argparse.Namespace, extra: Sequence[str]):
    """The YAML file is optional: `mdpo train key=value ...` configures everything from overrides."""
    from mdpo.config import load_config, translate_args

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]
    return load_config(config, translate_args(overrides + list(extra)))


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = _config_and_overrides(args, extra)
    _start()
    from mdpo.training.trainer import train

    train(cfg)
    return 0


def cmd_precompute_ref(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = _config_and_overrides(args, extra)
    _start()
    from mdpo.training.trainer import precompute_reference

    precompute_reference(cfg)
    return 0


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise MdpoError(f"unexpected arguments for demo: {' '.join(extra)}")
    _start()
    from mdpo.demo import run_demo

    run_demo(args.out)
    return 0


def cmd_data_stats(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise MdpoError(f"unexpected arguments for data stats: {' '.join(extra)}")
    quiet_libraries()
    from mdpo.data.stats import print_stats

    return print_stats(args)


def cmd_convert(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise MdpoError(f"unexpected arguments for convert: {' '.join(extra)}")
    quiet_libraries()
    from mdpo.checkpoint import convert

    if args.direction == "hf-to-megatron":
        out = convert.hf_to_megatron(
            args.hf, args.out, tp=args.tp, pp=args.pp, position_embedding=args.position_embedding
        )
    else:
        out = convert.megatron_to_hf(args.ckpt, args.out)
    print(f"[mdpo] wrote {out}")
    return 0


def cmd_plot(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise MdpoError(f"unexpected arguments for plot: {' '.join(extra)}")
    from mdpo.plot import plot_metrics

    print(plot_metrics(args.run_dir, args.out))
    return 0


def cmd_plan(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise MdpoError(f"unexpected arguments for plan: {' '.join(extra)}")
    from mdpo.planner import run

    print(run(args))
    return 0


def cmd_sweep(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise MdpoError(f"unexpected arguments for sweep: {' '.join(extra)}")
    from mdpo.sweep import run_sweep

    print(run_sweep(args.sweep))
    return 0


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
    demo = sub.add_parser("demo", help="a complete DPO run on a built-in task, no download")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.set_defaults(func=cmd_demo)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    from mdpo.data.stats import add_arguments

    stats = data.add_parser(
        "stats", help="counts, token-length percentiles, truncation, padding waste and packing efficiency"
    )
    add_arguments(stats).set_defaults(func=cmd_data_stats)
    conv = sub.add_parser("convert", help="HF model folder <-> Megatron-Core distributed checkpoint").add_subparsers(
        dest="direction", required=True
    )
    to_mcore = conv.add_parser(
        "hf-to-megatron",
        help="HF folder (Llama 2 / Tulu 2, Qwen 1.0, Baichuan 2) -> reshardable Megatron checkpoint",
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
    to_mcore.set_defaults(func=cmd_convert)
    to_hf = conv.add_parser(
        "megatron-to-hf", help="converted or training checkpoint (step_N folder) -> HF folder of the model's family"
    )
    to_hf.add_argument("--ckpt", required=True, help="mdpo convert output or training checkpoint folder")
    to_hf.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_hf.set_defaults(func=cmd_convert)
    from mdpo.planner import add_arguments as plan_arguments

    planner = sub.add_parser("plan", help="predict per-GPU memory and step time of layouts; rank the feasible ones")
    plan_arguments(planner).set_defaults(func=cmd_plan)
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
    args, extra = build_parser().parse_known_args(argv)
    try:
        return args.func(args, extra)
    except MdpoError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"mdpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
