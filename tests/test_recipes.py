"""The recipes' shared steps (examples/_dpo_recipe.sh): convert, precompute the reference, train, export, on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from conftest import REPO, tiny_run_files

from mdpo.parallel import free_port


def test_recipe_steps_run_end_to_end(tmp_path):
    files = tiny_run_files(tmp_path, n_train=160, n_eval=0, data_seed=3, model_seed=7)
    for file in files["tokenizer"].iterdir():  # a HF model folder carries its tokenizer; the conversion keeps it
        shutil.copy(file, files["hf"] / file.name)
    script = (
        "TP=1; MAX_LENGTH=32; TEMPLATE=raw; RECIPE_ARGS=(logging.progress=false logging.plot=false); "
        "source examples/_dpo_recipe.sh schedule.train_steps=2"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(HF_MODEL=str(files["hf"]), DATA=str(files["train"]), WORK=str(tmp_path / "work"), GPUS_PER_NODE="1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # fmt: skip
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "work"
    assert (work / "mcore" / "mdpo_model.json").is_file() and (work / "reference" / "train.safetensors").is_file()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["learning_rate"] == 0.0  # warmup starts at 0
    assert (work / "hf" / "config.json").is_file()
