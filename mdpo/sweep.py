"""`mdpo sweep SWEEP.yaml`: a grid of short training runs (model sizes x layouts), one CSV row each, and plots.

    config: tiny.yaml            # optional train config, relative to the sweep file
    overrides: [schedule.global_batch_size=8]      # applied to every run
    grid:                        # every combination is one run
      model.hidden_size: [256, 512]
      parallel.tp: [1, 2]
    nproc: 2                     # processes (GPUs) per run, started with torchrun
    steps: 4                     # optimizer steps per run, of which the first `warmup` are not timed
    warmup: 1
    out: runs/sweep              # OUT/sweep.csv, OUT/sweep.png, one run folder per combination

A rerun skips the combinations already in OUT/sweep.csv, so an interrupted sweep resumes where it stopped. A run
that fails (a layout that does not fit or divide) gets a row with its one-line error and the sweep goes on.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from tqdm import tqdm

from mdpo.errors import ConfigError

KEYS = {"config", "overrides", "grid", "nproc", "steps", "warmup", "out"}
RESULTS = ("status", "step_s", "tokens_per_s", "tokens_per_s_per_gpu", "peak_memory_gib", "error")


def load_sweep(path: Path) -> dict[str, Any]:
    """The sweep file, checked: known keys, a non-empty grid of lists, steps > warmup."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"{path}: needs a `grid:` mapping of config keys to lists of values")
    unknown = set(spec) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(KEYS)}")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
    spec = {"overrides": [], "nproc": 1, "steps": 4, "warmup": 1, "out": "runs/sweep", **spec}
    if spec["steps"] <= spec["warmup"]:
        raise ConfigError(f"{path}: steps ({spec['steps']}) must exceed warmup ({spec['warmup']})")
    if spec.get("config"):
        spec["config"] = str(path.parent / spec["config"])
    return spec


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def entry_name(entry: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in entry.items()).replace("/", "_")


def run_entry(spec: dict[str, Any], entry: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One short `mdpo train` of this combination; its timing and memory, or its error."""
    nproc = spec["nproc"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), "-m", "mdpo", "train"]
    command += [spec["config"]] if spec.get("config") else []
    command += [*spec["overrides"], *(f"{key}={value}" for key, value in entry.items())]
    command += [
        f"schedule.train_steps={spec['steps']}",
        f"logging.run_dir={run_dir}",
        "logging.progress=false",
        "logging.plot=false",
        "checkpoint.save_at_end=false",
        "checkpoint.export_hf=false",
        "checkpoint.resume=none",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        error = next((line for line in lines if line.startswith("mdpo: error:")), lines[-1] if lines else "failed")
        return {"status": "failed", "error": error.removeprefix("mdpo: error: ")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_second" in r][spec["warmup"] :]
    step_s = sum(r["num_tokens"] / r["tokens_per_second"] for r in timed) / len(timed)
    tokens_per_s = sum(r["num_tokens"] for r in timed) / len(timed) / step_s
    return {
        "status": "ok",
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_gpu": round(tokens_per_s / nproc, 1),
        "peak_memory_gib": round(max(r["peak_memory_gib"] for r in timed), 3),
        "error": "",
    }


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> Path:
    """Tokens/s per GPU and peak memory of every finished combination, side by side."""
    done = [row for row in rows if row["status"] == "ok"]
    fig = Figure(figsize=(14, 1.5 + 0.45 * max(1, len(done))))
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "tokens_per_s_per_gpu", "tokens/s per GPU"),
        (axes[1], "peak_memory_gib", "peak memory (GiB)"),
    ):
        ax.barh([row["entry"] for row in done], [float(row[key]) for row in done])
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return out


def run_sweep(path: str | Path) -> Path:
    """Run the combinations not yet in OUT/sweep.csv, appending a row after each; then draw OUT/sweep.png."""
    spec = load_sweep(Path(path))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    table = out / "sweep.csv"
    keys = list(spec["grid"])
    fields = ["entry", *keys, *RESULTS]
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    done = {row["entry"] for row in rows}
    todo = [entry for entry in combinations(spec["grid"]) if entry_name(entry) not in done]
    print(f"[mdpo] sweep: {len(todo)} to run, {len(done)} already in {table}")
    for entry in tqdm(todo, desc="sweep"):
        name = entry_name(entry)
        row = {"entry": name, **entry, **run_entry(spec, entry, out / name)}
        rows.append({key: row.get(key, "") for key in fields})
        new = not table.exists()
        with table.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow(rows[-1])
    return plot_sweep(rows, out / "sweep.png")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("sweep", help="sweep YAML (config, overrides, grid, nproc, steps, warmup, out)")
    return parser
