"""The recipes' shared steps (examples/_dpo_recipe.sh): convert, precompute the reference, train, export, on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess

from conftest import REPO, subprocess_env, tiny_run_files

from mdpo.parallel import free_port


def test_recipe_steps_run_end_to_end(tmp_path):
    files = tiny_run_files(tmp_path, n_train=160, n_eval=0, data_seed=3, model_seed=7)
    for file in files["tokenizer"].iterdir():  # a HF model folder carries its tokenizer; the conversion keeps it
        shutil.copy(file, files["hf"] / file.name)
    script = (
        "TP=1; MAX_LENGTH=32; TEMPLATE=raw; RECIPE_ARGS=(logging.progress=false logging.plot=false); "
        "source examples/_dpo_recipe.sh schedule.train_steps=2"
    )
    env = subprocess_env(HF_MODEL=str(files["hf"]), DATA=str(files["train"]), WORK=str(tmp_path / "work"),
                         GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))  # fmt: skip
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "work"
    assert (work / "mcore" / "mdpo_model.json").is_file() and (work / "reference" / "train.safetensors").is_file()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["learning_rate"] == 0.0  # warmup starts at 0
    assert (work / "hf" / "config.json").is_file()


def test_slurm_script_starts_one_recipe_per_node_with_the_rendezvous_of_node_0(tmp_path):
    """examples/slurm/dpo_tulu2_13b.sbatch with stand-ins for SLURM's scontrol and srun (srun runs its command once
    per node with that node's SLURM_NODEID) and a recipe that prints what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\n'
    (bin_dir / "scontrol").write_text(scontrol)
    srun = '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
    srun += 'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit 1; done\n'
    (bin_dir / "srun").write_text(srun)
    recipe = tmp_path / "recipe.sh"
    recipe.write_text('echo "node=$NODE_RANK of $NNODES at $MASTER_ADDR:$MASTER_PORT gpus=$GPUS_PER_NODE args=$*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = subprocess_env(PATH=f"{bin_dir}:{subprocess_env()['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]",
                         SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(REPO), RECIPE=str(recipe))  # fmt: skip
    script = REPO / "examples" / "slurm" / "dpo_tulu2_13b.sbatch"
    result = subprocess.run(["bash", str(script), "logging.wandb_project=x"], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "node=0 of 2 at gpu07:29500 gpus=8 args=logging.wandb_project=x",
        "node=1 of 2 at gpu07:29500 gpus=8 args=logging.wandb_project=x",
    ]
