"""`mdpo demo`: a complete DPO run that needs no download.

A tiny Llama-architecture model (random init) learns to prefer a faithful echo of a digit string over one with a
wrong digit ("48213=" -> "48213" over "48293"), trained with the same trainer, schedule and metrics as a real run.
Held-out strings (never seen in training) measure whether the preference generalises: `eval_rewards/accuracies`
is reported before (0 by construction: the policy equals the reference) and after training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mdpo.config import TrainConfig, validate
from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data
from mdpo.training.trainer import train

DEMO_MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def demo_config(out: str | Path, **overrides: dict) -> TrainConfig:
    """Write the tokenizer and data under `out` and return the run's config (sections overridable)."""
    out = Path(out)
    tokenizer = build_demo_tokenizer(out / "tokenizer")
    train_file, eval_file = make_demo_data(out / "data", n_train=4096, n_eval=128, seed=0)
    cfg = TrainConfig()
    for key, value in {**DEMO_MODEL, "vocab_size": len(tokenizer)}.items():
        setattr(cfg.model, key, value)
    cfg.data.train_file, cfg.data.eval_file, cfg.data.tokenizer = (
        str(train_file),
        str(eval_file),
        str(out / "tokenizer"),
    )
    cfg.data.max_length = 32
    cfg.schedule.global_batch_size, cfg.schedule.micro_batch_size = 32, 32
    cfg.schedule.train_steps, cfg.schedule.warmup_ratio = 400, 0.1
    cfg.optimizer.lr, cfg.optimizer.clip_grad = 2e-3, 1.0
    cfg.dpo.beta = 0.25
    cfg.logging.eval_interval = 50
    cfg.checkpoint.resume = "none"  # a second `mdpo demo` starts afresh
    cfg.logging.run_dir = str(out)
    for section, values in overrides.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    validate(cfg)
    return cfg


def run_demo(out: str | Path = "runs/demo", **overrides: dict) -> dict[str, float]:
    """Run the demo; prints held-out accuracy before and after, and where metrics and the plot went."""
    cfg = demo_config(out, **overrides)
    summary = train(cfg)
    print(
        f"held-out rewards/accuracies: {summary['initial_eval_rewards/accuracies']:.3f} before, "
        f"{summary['eval_rewards/accuracies']:.3f} after {cfg.schedule.train_steps} steps "
        f"(eval_rewards/margins {summary['eval_rewards/margins']:.3f})\n"
        f"metrics: {Path(cfg.logging.run_dir) / 'metrics.jsonl'}\n"
        f"plot:    {Path(cfg.logging.run_dir) / 'metrics.png'}\n"
        f"model:   {Path(cfg.logging.run_dir) / 'hf'}"
    )
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    return parser
