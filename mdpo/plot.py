"""Draw a run's metrics.jsonl as one PNG: rewards, accuracies, margins, loss and log-probs over steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

PANELS = (
    ("rewards", ("rewards/chosen", "rewards/rejected")),
    ("accuracies", ("rewards/accuracies",)),
    ("margins", ("rewards/margins",)),
    ("loss", ("loss",)),
    ("log-probs", ("logps/chosen", "logps/rejected")),
    ("logits", ("logits/chosen", "logits/rejected")),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Train curves as lines, eval points (``eval_`` names) as markers; returns the PNG path. (A bare `Figure`:
    no pyplot, so no GUI backend and no global figure state.)"""
    records = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3)
    for ax, (title, names) in zip(axes.flat, PANELS):
        for name in names:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                points = [(r["step"], r[prefix + name]) for r in records if prefix + name in r]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, label=prefix + name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    return parser
