"""`mdpo sweep`: a grid of short runs, a CSV row each (failures included), a plot, and a rerun that resumes."""

from __future__ import annotations

import csv

import yaml
from conftest import run_mdpo

from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data


def test_sweep_runs_the_grid_records_failures_and_resumes(tmp_path):
    build_demo_tokenizer(tmp_path / "tok")
    train, _ = make_demo_data(tmp_path / "data", n_train=32, n_eval=0)
    config = {
        "model": {"vocab_size": 128, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "data": {"train_file": str(train), "tokenizer": str(tmp_path / "tok"), "max_length": 48},
        "schedule": {"global_batch_size": 4, "micro_batch_size": 2, "warmup_ratio": 0.0},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    sweep = {
        "config": "base.yaml",
        "grid": {"model.hidden_size": [32], "parallel.tp": [1, 3]},
        "steps": 3,
        "warmup": 1,
        "out": str(tmp_path / "out"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    first = run_mdpo(["sweep", str(tmp_path / "sweep.yaml")])
    assert first.returncode == 0, first.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [(r["model.hidden_size"], r["parallel.tp"], r["status"]) for r in rows] == [
        ("32", "1", "ok"),
        ("32", "3", "failed"),
    ]
    for row in rows:
        if row["status"] == "ok":
            assert float(row["tokens_per_s_per_gpu"]) > 0 and float(row["peak_memory_gib"]) > 0
            metrics = tmp_path / "out" / row["entry"] / "metrics.jsonl"
            assert len(metrics.read_text().splitlines()) == 3
        else:
            assert "parallel.tp=3" in row["error"] and "\n" not in row["error"]
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0

    # A grown grid: the rerun runs only the new combinations.
    sweep["grid"]["model.hidden_size"].append(48)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    second = run_mdpo(["sweep", str(tmp_path / "sweep.yaml")])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 to run, 2 already in" in second.stdout
    grown = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [(r["model.hidden_size"], r["parallel.tp"], r["status"]) for r in grown[2:]] == [
        ("48", "1", "ok"),
        ("48", "3", "failed"),
    ]


def test_bad_sweep_file_is_one_clear_line(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"grid": {"parallel.tp": []}}))
    result = run_mdpo(["sweep", str(tmp_path / "s.yaml")])
    assert result.returncode == 2 and "grid.parallel.tp must be a non-empty list" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
