"""A 20-step DPO run on real HH-RLHF pairs with the Llama 2 tokenizer under TP=2 lowers the loss."""

from __future__ import annotations

import json

import yaml
from conftest import run_mdpo, shared_path


def test_hh_tp2_lowers_loss(tmp_path, llama2_tokenizer_dir):
    source = shared_path("data", "hh_helpful_base_test_500.jsonl")
    subset = tmp_path / "hh32.jsonl"
    subset.write_text("".join(source.read_text().splitlines(keepends=True)[:32]))
    config = {
        "model": {
            "vocab_size": 32000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        },
        "data": {
            "train_file": str(subset),
            "tokenizer": str(llama2_tokenizer_dir),
            "max_length": 96,
            "on_bad_row": "skip",
        },
        "parallel": {"tp": 2},
        "schedule": {"global_batch_size": 8, "micro_batch_size": 2, "train_steps": 20, "warmup_ratio": 0.1},
        "optimizer": {"lr": 5e-4},
        "logging": {"run_dir": str(tmp_path / "run"), "progress": False},
        "checkpoint": {"export_hf": False},
    }
    path = tmp_path / "hh.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_mdpo(["train", str(path)], nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 20
    assert abs(losses[0] - 0.693147) < 1e-4  # policy == reference at step 1
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, losses
    assert records[-1]["rewards/accuracies"] > 0.5
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
