"""The recipes' shared steps (examples/_dpo_recipe.sh): convert, precompute the reference, train, export, on CPU,
through the seed's launcher (tuning.sh), the Tulu 3 recipe and the SLURM script."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from conftest import REPO, read_folder, script_env, shared_path, subprocess_env, tiny_hf_family, tiny_run_files
from safetensors.torch import load_file

from mdpo.parallel import free_port


def test_tuning_sh_runs_both_modes_over_the_seeds_folders(tmp_path):
    """`examples/tuning.sh MODE LOSS ROOT` (the seed's launcher) over ROOT/model/<HF folder> and ROOT/data/<file>,
    MODE 0 (full tuning) and 1 (LoRA) side by side: the shared recipe's steps (convert, precompute the reference,
    train, export) run, each mode writes what it should, and a bad MODE is one line."""
    files = tiny_run_files(tmp_path, n_train=160, n_eval=0, data_seed=3, model_seed=7)
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copytree(files["hf"], root / "model" / "tiny-llama")
    for file in files["tokenizer"].iterdir():  # a HF model folder carries its tokenizer; the conversion keeps it
        shutil.copy(file, root / "model" / "tiny-llama" / file.name)
    shutil.copy(files["train"], root / "data" / "train.jsonl")

    def tuning(mode: str, loss: str) -> subprocess.CompletedProcess:
        env = script_env(GPUS_PER_NODE="1", TP="1", MAX_LENGTH="32", TEMPLATE="raw", MASTER_PORT=str(free_port()))
        cmd = [
            "bash",
            "examples/tuning.sh",
            mode,
            loss,
            str(root),
            "schedule.train_steps=2",
            "logging.progress=false",
            "logging.plot=false",
        ]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:
        full, lora = pool.submit(tuning, "0", "sigmoid"), pool.submit(tuning, "1", "ipo")
        full, lora = full.result(), lora.result()
    for result in (full, lora):
        assert result.returncode == 0, result.stderr[-3000:]
    for mode, loss, lr in (("0", "sigmoid", 1e-6), ("1", "ipo", 5e-6)):
        work = root / "runs" / f"tiny-llama_{loss}_mode{mode}"
        assert (work / "mcore" / "mdpo_model.json").is_file() and (work / "reference" / "train.safetensors").is_file()
        records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2] and records[0]["learning_rate"] == 0.0  # warmup starts at 0
        config = yaml.safe_load((work / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == lr and config["dpo"]["loss_type"] == loss, mode
        assert config["lora"]["rank"] == (64 if mode == "1" else 0) and config["dpo"]["beta"] == 0.1
        assert config["schedule"]["global_batch_size"] == 128 and config["schedule"]["epochs"] == 3
        assert (work / "hf" / "config.json").is_file()
        assert (work / "adapter" / "adapter_config.json").is_file() == (mode == "1"), mode
    adapter = json.loads((root / "runs" / "tiny-llama_ipo_mode1" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 128 and adapter["lora_dropout"] == 0.05
    bad = subprocess.run(
        ["bash", "examples/tuning.sh", "2", "sigmoid", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "tuning.sh: MODE must be 0 (full tuning) or 1 (LoRA), got '2'"


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
    recipe.write_text(
        'echo "node=$NODE_RANK of $NNODES at $MASTER_ADDR:$MASTER_PORT gpus=$GPUS_PER_NODE '
        'budget=$EXIT_DURATION_MINUTES args=$*"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = subprocess_env(
        PATH=f"{bin_dir}:{subprocess_env()['PATH']}",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(REPO),
        RECIPE=str(recipe),
    )
    script = REPO / "examples" / "slurm" / "dpo_tulu2_13b.sbatch"
    result = subprocess.run(
        ["bash", str(script), "logging.wandb_project=x"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "node=0 of 2 at gpu07:29500 gpus=8 budget=1420 args=logging.wandb_project=x",
        "node=1 of 2 at gpu07:29500 gpus=8 budget=1420 args=logging.wandb_project=x",
    ]


def test_tulu3_recipe_runs_tulu3s_settings_over_llama3s_tokenizer(tmp_path):
    """examples/dpo_tulu3_8b.sh on CPU: a tiny Llama 3.1 (RoPE scaling, the 128,256-entry vocabulary) with the real
    Llama 3 tokenizer, the UltraFeedback sample in the Tulu 3 format; the recipe's settings reach the run (Tulu 3's
    published hyperparameters) and the export keeps the source's config.json."""
    from transformers import AutoTokenizer

    tokenizer = shared_path("tokenizers", "llama3")
    data = shared_path("data", "ultrafeedback_binarized_sample_200.jsonl")
    hf = tmp_path / "Llama-3.1-Tulu-3-8B-SFT"
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))  # 128,256: the output layer is most of the work here
    tiny_hf_family("llama3.1", vocab_size=vocab, hidden_size=32, num_hidden_layers=2).save_pretrained(hf)
    for file in tokenizer.iterdir():
        shutil.copy(file, hf / file.name)
    work = tmp_path / "work"
    env = script_env(
        GPUS_PER_NODE="1",
        TP="1",
        MAX_LENGTH="48",
        HF_MODEL=str(hf),
        DATA=str(data),
        WORK=str(work),
        MASTER_PORT=str(free_port()),
    )
    # prompts cut to 24 tokens (else most UltraFeedback prompts fill 48 and are dropped): all 200 pairs, a full batch
    cmd = [
        "bash",
        "examples/dpo_tulu3_8b.sh",
        "data.max_prompt_length=24",
        "schedule.train_steps=2",
        "logging.progress=false",
        "logging.plot=false",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["optimizer"]["lr"] == 5e-7 and config["optimizer"]["weight_decay"] == 0.0
    assert config["dpo"]["loss_type"] == "sigmoid_norm" and config["dpo"]["beta"] == 5.0
    assert config["schedule"]["global_batch_size"] == 128 and config["schedule"]["epochs"] == 1
    assert config["schedule"]["warmup_ratio"] == 0.1 and config["data"]["template"] == "tulu3"
    assert config["model"]["rope_scaling"] == "llama3" and config["model"]["vocab_size"] == 128256
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert json.loads((work / "hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def run_moe_recipe(
    tmp_path: Path, script: str, case: str, folder: str, reuse: Path | None = None, **env: str
) -> tuple[Path, Path]:
    """`examples/SCRIPT` on CPU with a tiny `case` model (Qwen's 151,936-row table: its tokenizer has 151,665 ids)
    saved as the HF folder with the real Qwen tokenizer beside it, over the UltraFeedback sample, for two steps on
    one node of 2 processes: (the HF folder, the run's work folder). `reuse`: an earlier run's work folder, whose
    conversion and reference cache this run starts with (the recipe skips those steps), its tokenizer read from
    there (the cache's stamp holds the data settings, the tokenizer's path among them)."""
    tokenizer = shared_path("tokenizers", "qwen2")
    hf = tmp_path / folder
    if reuse is None:
        tiny_hf_family(case, vocab_size=151936, hidden_size=32, num_hidden_layers=2).save_pretrained(hf)
        for file in tokenizer.iterdir():
            shutil.copy(file, hf / file.name)
    work = tmp_path / ("work" if reuse is None else "work_reused")
    for step in ("mcore", "reference") if reuse is not None else ():
        shutil.copytree(reuse / step, work / step)
    env = script_env(
        NNODES="1",
        GPUS_PER_NODE="2",
        GLOBAL_BATCH="32",  # of the 200 pairs (the recipe's own 128 x nodes is _dpo_recipe.sh's, tested above)
        MAX_LENGTH="48",
        HF_MODEL=str(hf),
        DATA=str(shared_path("data", "ultrafeedback_binarized_sample_200.jsonl")),
        WORK=str(work),
        MASTER_PORT=str(free_port()),
        **env,
    )
    cmd = ["bash", f"examples/{script}", "data.max_prompt_length=24", "schedule.train_steps=2"]
    cmd += [f"data.tokenizer={reuse / 'mcore'}"] if reuse is not None else []
    cmd += ["logging.progress=false", "logging.plot=false"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return hf, work


def test_qwen3_moe_recipe_trains_with_expert_parallelism(tmp_path):
    """examples/dpo_qwen3_30b_a3b.sh on CPU with a tiny Qwen3-MoE (4 experts, one dense layer) and the real Qwen
    tokenizer over the UltraFeedback sample: converted in one process, the reference precomputed and DPO run at EP=2
    over 2 processes; the load-balancing loss is logged and the export keeps the source's config.json."""
    hf, work = run_moe_recipe(tmp_path, "dpo_qwen3_30b_a3b.sh", "qwen3_moe", "Qwen3-30B-A3B", TP="1", EP="2")
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["parallel"]["ep"] == 2 and config["parallel"]["etp"] == 1 and config["parallel"]["pp"] == 1
    assert config["model"]["num_experts"] == 4 and config["model"]["router_aux_loss_coef"] == 0.001
    assert config["data"]["template"] == "tokenizer" and config["schedule"]["global_batch_size"] == 32
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["aux_loss"] > 0 for r in records)
    assert json.loads((work / "hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def test_gpt_oss_recipe_trains_with_expert_parallelism(tmp_path):
    """examples/dpo_gpt_oss_120b.sh on CPU with a tiny gpt-oss (sinks, biased experts, windows) and the real Qwen
    tokenizer over the UltraFeedback sample: converted in one process, the reference precomputed and DPO run at EP=2
    over 2 processes (the experts whole on each rank, as their biases need); the export keeps the source's
    config.json."""
    hf, work = run_moe_recipe(tmp_path, "dpo_gpt_oss_120b.sh", "gpt_oss", "gpt-oss-120b", TP="1", PP="1", EP="2")
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["parallel"]["ep"] == 2 and config["parallel"]["etp"] == 1
    assert config["model"]["family"] == "gpt_oss" and config["model"]["attention_sinks"]
    assert config["data"]["template"] == "tokenizer" and config["schedule"]["global_batch_size"] == 32
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["aux_loss"] > 0 for r in records)
    assert json.loads((work / "hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def test_glm45_air_recipe_trains_with_expert_parallelism(tmp_path):
    """examples/dpo_glm45_air.sh (full tuning) on CPU with a tiny GLM-4.5 (half-rotary heads with q/k/v biases and
    q/k norms, a dense layer, sigmoid-routed experts with the correction bias beside a shared expert, an MTP layer)
    and the real Qwen tokenizer over the UltraFeedback sample: converted in one process, the reference precomputed
    and DPO run at EP=2 over 2 processes; the export keeps the source's config.json, its correction biases (never
    trained) and its multi-token prediction layer (carried untrained)."""
    hf, work = run_moe_recipe(tmp_path, "dpo_glm45_air.sh", "glm4_moe", "GLM-4.5-Air", TP="1", PP="1", EP="2")
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["parallel"]["ep"] == 2 and config["parallel"]["etp"] == 1
    assert config["parallel"]["recompute"] == "selective"
    assert config["model"]["family"] == "glm4_moe" and config["model"]["partial_rotary_factor"] == 0.5
    assert config["data"]["template"] == "tokenizer" and config["schedule"]["global_batch_size"] == 32
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "aux_loss" not in records[0]  # GLM-4.5 has none
    assert json.loads((work / "hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    source, exported = load_file(str(hf / "model.safetensors")), load_file(str(work / "hf" / "model.safetensors"))
    untrained = [name for name in source if name.startswith("model.layers.2.") or "e_score_correction" in name]
    assert any(name.startswith("model.layers.2.") for name in untrained)  # the MTP layer (2 layers, then it)
    for name in untrained:
        assert torch.equal(exported[name], source[name]), name
    trained = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(exported[trained], source[trained])  # training moved the weights


def test_deepseek_v3_recipe_trains_with_expert_parallelism(tmp_path):
    """examples/dpo_deepseek_v3.sh on CPU with a tiny DeepSeek-V3 (MLA, 8 experts in 4 groups beside a shared one, a
    dense first layer, a multi-token prediction layer in the files) and the real Qwen tokenizer over the
    UltraFeedback sample, full tuning, then LoRA (LORA=1) from the same conversion and reference cache:
    DPO at EP=2 over 2 processes with DeepSeek-V3's sequence-wise balancing loss; each export keeps the source's
    config.json and carries the prediction layer's tensors bitwise."""
    hf, full = run_moe_recipe(tmp_path, "dpo_deepseek_v3.sh", "deepseek_v3", "DeepSeek-V3", TP="1", EP="2")
    _, lora = run_moe_recipe(
        tmp_path, "dpo_deepseek_v3.sh", "deepseek_v3", "DeepSeek-V3", reuse=full, LORA="1", TP="1", EP="2"
    )
    source = read_folder(hf)
    carried = [key for key in source if key.startswith("model.layers.2.")]  # layers 0 and 1 are trained
    assert carried
    for work, is_lora in ((full, False), (lora, True)):
        config = yaml.safe_load((work / "config.yaml").read_text())
        assert config["parallel"]["ep"] == 2 and config["parallel"]["etp"] == 1 and config["parallel"]["pp"] == 1
        assert config["model"]["family"] == "deepseek_v3" and config["model"]["kv_lora_rank"] == 16
        assert config["dpo"]["router_aux_loss_type"] == "seq" and config["dpo"]["router_aux_loss_coef"] == 1e-4
        assert config["data"]["template"] == "tokenizer" and config["schedule"]["global_batch_size"] == 32
        assert config["optimizer"]["lr"] == (5e-6 if is_lora else 1e-6)
        assert config["lora"]["rank"] == (64 if is_lora else 0)
        assert config["parallel"]["recompute"] == ("none" if is_lora else "full")
        records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2] and all(r["aux_loss"] > 0 for r in records)
        assert json.loads((work / "hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
        exported = read_folder(work / "hf")
        assert all(torch.equal(exported[key], source[key]) for key in carried)
    adapter = json.loads((lora / "adapter" / "adapter_config.json").read_text())
    assert "self_attn.q_a_proj" in adapter["target_modules"] and adapter["r"] == 64
