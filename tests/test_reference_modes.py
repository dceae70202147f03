"""Reference modes: precomputed log-probs reproduce the online reference; stale or partial caches are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_mdpo, tiny_hf_llama, tiny_run_files


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    files = tiny_run_files(root, n_train=48, n_eval=8, data_seed=1, model_seed=4)
    config = {
        "model": {"init_from": str(files["hf"])},
        "data": {
            "train_file": str(files["train"]),
            "eval_file": str(files["eval"]),
            "tokenizer": str(files["tokenizer"]),
            "max_length": 64,
        },
        "schedule": {"global_batch_size": 8, "micro_batch_size": 4, "train_steps": 4, "warmup_ratio": 0.0},
        "optimizer": {"lr": 1e-3},
        "dpo": {"reference_cache": str(root / "cache")},
        "logging": {"progress": False, "plot": False, "eval_interval": 2},
        "checkpoint": {"export_hf": False},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(root: Path, name: str, *overrides: str, nproc: int = 1):
    return run_mdpo(["train", str(root / "config.yaml"), f"logging.run_dir={root / name}", *overrides], nproc)


def test_precomputed_equals_online(setup):
    # Precompute under TP=2 (two processes) to exercise the distributed gather; train at TP=1.
    result = run_mdpo(["precompute-ref", str(setup / "config.yaml"), "parallel.tp=2"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (setup / "cache" / "train.safetensors").exists() and (setup / "cache" / "eval.safetensors").exists()
    for name, mode in (("online", "online"), ("pre", "precomputed")):
        result = train(setup, name, f"dpo.reference={mode}")
        assert result.returncode == 0, result.stderr[-3000:]
    online, pre = metrics(setup / "online"), metrics(setup / "pre")
    assert len(online) == len(pre) == 4 + 3  # 4 steps; eval before, after step 2, and at the end
    assert [r["step"] for r in online if "eval_loss" in r] == [0, 2, 4]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "eval_loss", "eval_rewards/margins")
    for a, b in zip(online, pre):
        for key in (k for k in keys if k in a):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
    assert abs(online[-1]["eval_rewards/margins"]) > 1e-3  # the policy moved away from the reference


def test_missing_cache_is_refused(setup, tmp_path):
    result = train(setup, "missing", "dpo.reference=precomputed", f"dpo.reference_cache={tmp_path}")
    assert result.returncode == 2
    assert "run `mdpo precompute-ref" in result.stderr and "Traceback" not in result.stderr


def test_stale_cache_names_what_changed(setup, tmp_path):
    import shutil

    if not (setup / "cache" / "train.safetensors").exists():
        pytest.skip("needs the cache written by test_precomputed_equals_online")
    changed = tmp_path / "train.jsonl"
    shutil.copy(setup / "data" / "train.jsonl", changed)
    with changed.open("a") as handle:
        handle.write(json.dumps({"prompt": "1=", "chosen": "1", "rejected": "2"}) + "\n")
    result = train(setup, "stale", "dpo.reference=precomputed", f"data.train_file={changed}")
    assert result.returncode == 2
    assert "stale reference cache: the data changed" in result.stderr


def test_partial_cache_is_refused(setup, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = setup / "cache" / "train.safetensors"
    if not source.exists():
        pytest.skip("needs the cache written by test_precomputed_equals_online")
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k)[:-3] for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)  drop three pairs
    save_file(tensors, str(tmp_path / "train.safetensors"), metadata=metadata)
    (tmp_path / "eval.safetensors").write_bytes((setup / "cache" / "eval.safetensors").read_bytes())
    result = train(setup, "partial", "dpo.reference=precomputed", f"dpo.reference_cache={tmp_path}")
    assert result.returncode == 2
    assert "partial reference cache: 3 pairs missing" in result.stderr


def test_reference_free_mode_builds_no_reference(setup):
    result = train(setup, "free", "dpo.reference=none", "dpo.loss_type=sigmoid")
    assert result.returncode == 0, result.stderr[-3000:]
    first = metrics(setup / "free")[1]  # step 1 (after the initial eval)
    # rewards are beta x policy log-probs when there is no reference
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-6)


def test_cache_of_another_reference_model_is_refused(setup, tmp_path):
    if not (setup / "cache" / "train.safetensors").exists():
        pytest.skip("needs the cache written by test_precomputed_equals_online")
    from mdpo.data.synthetic import build_demo_tokenizer

    other = tmp_path / "other_hf"
    tiny_hf_llama(seed=99, vocab_size=len(build_demo_tokenizer(tmp_path / "tok"))).save_pretrained(other)
    result = train(setup, "other", "dpo.reference=precomputed", f"model.init_from={other}")
    assert result.returncode == 2
    assert "stale reference cache: the reference checkpoint changed" in result.stderr


def test_stamp_keeps_older_caches_and_follows_best_vs_randoms_seed(tmp_path):
    """Data settings newer than a cache change its stamp only when set; best_vs_random's pairs follow schedule.seed
    (data.seed unset), so the stamp does too; other rules' do not."""
    from mdpo.config import load_config
    from mdpo.training.reference import reference_stamp

    (tmp_path / "d.jsonl").write_text("{}\n")
    files = [f"data.train_file={tmp_path / 'd.jsonl'}", f"data.tokenizer={tmp_path}", f"model.init_from={tmp_path}"]
    stamp = lambda *overrides: reference_stamp(load_config(None, [*files, *overrides]))
    assert stamp()["data"] == stamp("data.train_empty_think=true", "data.chat_template_kwargs={}")["data"]
    assert stamp()["data"] != stamp("data.train_empty_think=false")["data"]
    assert stamp()["data"] == stamp("schedule.seed=7")["data"]
    drawn = ("data.rank_pairs=best_vs_random",)
    assert stamp(*drawn)["data"] != stamp(*drawn, "schedule.seed=7")["data"]
    assert stamp(*drawn, "schedule.seed=7")["data"] == stamp(*drawn, "data.seed=7")["data"]
