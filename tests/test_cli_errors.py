"""User errors end in one line naming the key, value or file:row, exit code 2, and no traceback."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_mdpo


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    root = tmp_path_factory.mktemp("cli")
    build_demo_tokenizer(root / "tok")
    train, _ = make_demo_data(root / "data", n_train=16, n_eval=4)
    config = {
        "model": {
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },  # fmt: skip
        "data": {"train_file": str(train), "tokenizer": str(root / "tok"), "max_length": 32},
        "schedule": {"global_batch_size": 4, "train_steps": 1},
        "logging": {"run_dir": str(root / "run"), "progress": False, "plot": False},
        "checkpoint": {"export_hf": False},
    }
    return root, config


def write_config(root, config, name="c.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def assert_user_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("mdpo: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_key(base):
    root, config = base
    result = run_mdpo(["train", str(write_config(root, config)), "optimizer.lrr=1"])
    assert_user_error(result, "optimizer.lrr")


def test_wrong_type(base):
    root, config = base
    bad = {**config, "schedule": {**config["schedule"], "micro_batch_size": "two"}}
    result = run_mdpo(["train", str(write_config(root, bad, "wrong_type.yaml"))])
    assert_user_error(result, "schedule.micro_batch_size", "two")


def test_missing_required_key(base):
    root, config = base
    bad = {**config, "data": {k: v for k, v in config["data"].items() if k != "train_file"}}
    result = run_mdpo(["train", str(write_config(root, bad, "missing.yaml"))])
    assert_user_error(result, "data.train_file")


def test_tp_not_dividing_heads(base):
    root, config = base
    result = run_mdpo(["train", str(write_config(root, config)), "--tensor-model-parallel-size", "3"])
    assert_user_error(result, "parallel.tp=3", "num_attention_heads=4")


def test_row_without_chosen(base):
    root, config = base
    data = root / "bad.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "rejected": "5"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_mdpo(["train", str(write_config(root, config)), f"data.train_file={data}"])
    assert_user_error(result, f"{data}:2", "'chosen'")


def test_world_size_not_divisible_by_layout(base):
    root, config = base
    result = run_mdpo(["train", str(write_config(root, config)), "parallel.tp=2"], nproc=1)
    assert_user_error(result, "world size 1", "parallel.tp")


def test_overrides_alone_configure_a_run():
    """No YAML file: the first key=value is an override, not a file name (the recipes rely on it)."""
    result = run_mdpo(["train", "data.train_file=pairs.jsonl", "schedule.train_steps=2"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mdpo: error: data.tokenizer is required (set it in the config file or pass data.tokenizer=...)"
    ]
