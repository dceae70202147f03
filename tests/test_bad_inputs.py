"""A corpus of malformed inputs, each with the exact message a user must see (one line, exit 2, no traceback).

All cases run through the real `mdpo` command line, one after another in one subprocess (start-up is paid once).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CLI_RUNNER, REPO, run_mdpo, subprocess_env, tiny_hf_family, tiny_hf_llama

from mdpo.models import families


def write_rows(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    root = tmp_path_factory.mktemp("bad")
    tokenizer = build_demo_tokenizer(root / "tok")
    train, _ = make_demo_data(root / "data", n_train=16, n_eval=4)
    hf = root / "hf"
    tiny_hf_llama(seed=0, vocab_size=len(tokenizer)).save_pretrained(hf)
    weights = load_file(str(hf / "model.safetensors"))

    def model_variant(name: str, tensors: dict | None = None) -> str:
        """A copy of the HF folder with other weights (None: no weights file at all)."""
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text((hf / "config.json").read_text())
        if tensors is not None:
            save_file(tensors, str(folder / "model.safetensors"))
        return str(folder)

    truncated = model_variant("truncated")
    data = (hf / "model.safetensors").read_bytes()
    (Path(truncated) / "model.safetensors").write_bytes(data[: len(data) // 2])
    wrong_shape = model_variant(
        "wrong_shape", {**weights, "model.norm.weight": weights["model.norm.weight"][:-1].clone()}
    )
    missing = model_variant("missing", {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"})
    no_weights = model_variant("no_weights")
    small_vocab = root / "small_vocab"
    tiny_hf_llama(seed=0, vocab_size=24).save_pretrained(small_vocab)

    base = {
        "model": {"init_from": str(hf)},
        "data": {"train_file": str(train), "tokenizer": str(root / "tok"), "max_length": 32},
        "schedule": {"global_batch_size": 4, "micro_batch_size": 2, "train_steps": 1},
        "logging": {"run_dir": str(root / "run"), "progress": False, "plot": False},
        "checkpoint": {"export_hf": False, "save_at_end": False},
    }
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump(base))
    no_train_file = root / "no_train_file.yaml"
    no_train_file.write_text(yaml.safe_dump({**base, "data": {"tokenizer": str(root / "tok")}}))
    (root / "broken.yaml").write_text("model:\n  init_from: [unclosed\n")
    (root / "a_file").write_text("")
    incomplete = root / "ckpt" / "step_0000001"
    incomplete.mkdir(parents=True)
    good = {"prompt": "12=", "chosen": "12", "rejected": "13"}
    bad = root / "rows"
    bad.mkdir()
    empty = root / "empty"
    empty.mkdir()
    (empty / "empty.jsonl").write_text("")
    (empty / "blank.jsonl").write_text("\n  \n\n")
    (empty / "empty.json").write_text("[]")
    pq.write_table(pa.table({k: pa.array([], pa.string()) for k in good}), empty / "empty.parquet")
    no_data = empty / "notes"
    no_data.mkdir()
    (no_data / "README.txt").write_text("not a data file")
    (no_data / "sub").mkdir()
    long_row = {"prompt": "1" * 40, "chosen": "2" * 10, "rejected": "3" * 10}  # over max_length=32
    hf_config = json.loads((hf / "config.json").read_text())

    def config_variant(name: str, **changes: object) -> str:
        """A model folder of config.json alone (the refusals below come before any weight is read)."""
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**hf_config, **changes}))
        return str(folder)

    dynamic = config_variant("dynamic", rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6})
    gemma = config_variant("gemma", architectures=["GemmaForCausalLM"], model_type="gemma")
    qwen3_moe = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4)
    shared_experts = config_variant("shared_experts", **qwen3_moe, shared_expert_intermediate_size=64)
    mixtral = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4)
    jitter = config_variant("jitter", **mixtral, router_jitter_noise=0.1)
    moe, mixtral_all_experts = root / "moe", root / "mixtral"
    tiny_hf_family("qwen3_moe", seed=0, vocab_size=len(tokenizer)).save_pretrained(moe)
    tiny_hf_family("mixtral", seed=0, vocab_size=len(tokenizer)).save_pretrained(mixtral_all_experts)
    moe_weights = load_file(str(moe / "model.safetensors"))
    expert_missing = root / "expert_missing"
    shutil.copytree(moe, expert_missing)
    del moe_weights["model.layers.2.mlp.experts.3.down_proj.weight"]
    save_file(moe_weights, str(expert_missing / "model.safetensors"))
    on_moe = f"model.init_from={moe}"
    c = str(config)
    # a run to resume (checkpoints of steps 1 and 2), a damaged copy of its last checkpoint (and one as if written
    # before manifests), a folder of only damaged ones, and fewer rows of its data
    resumable = root / "resumable"
    saved = run_mdpo(
        [
            "train",
            c,
            f"logging.run_dir={resumable}",
            "schedule.train_steps=2",
            "checkpoint.save_interval=1",
            "checkpoint.save_at_end=true",
        ]
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    damaged = shutil.copytree(resumable / "checkpoints" / "step_0000002", root / "damaged" / "step_0000002")
    shard = sorted(damaged.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    unchecked = shutil.copytree(damaged, root / "unchecked" / "step_0000002")
    (unchecked / "mdpo_manifest.json").unlink()
    every_damaged = shutil.copytree(resumable / "checkpoints", root / "every_damaged" / "checkpoints")
    for step in every_damaged.iterdir():
        (step / ".metadata").write_bytes(b"")
    fewer = write_rows(root / "fewer.jsonl", train.read_text().splitlines()[:12])
    resume = ["train", c, f"logging.run_dir={resumable}", "schedule.train_steps=2"]
    cases = {
        # configs
        "unknown key": (["train", c, "optimizer.lrr=1"], "unknown config key 'optimizer.lrr'"),
        "wrong type": (["train", c, "schedule.micro_batch_size=two"], "schedule.micro_batch_size"),
        "malformed override": (["train", c, "optimizer.lr"], "unexpected argument 'optimizer.lr': expected key=value"),
        "YAML syntax": (["train", str(root / "broken.yaml")], "broken.yaml: line"),
        "missing required key": (["train", str(no_train_file)], "data.train_file is required"),
        "TP not dividing heads": (
            ["train", c, "parallel.tp=3"],
            "parallel.tp=3 does not divide model.num_attention_heads=4",
        ),
        "Megatron-style flag": (
            ["train", c, "--tensor-model-parallel-size", "8"],
            "parallel.tp=8 does not divide model.num_attention_heads=4",
        ),
        # no YAML file: the first key=value is an override, not a file name (the recipes rely on it)
        "overrides alone": (
            ["train", "data.train_file=pairs.jsonl", "schedule.train_steps=2"],
            "data.tokenizer is required (set it in the config file or pass data.tokenizer=...)",
        ),
        "layout vs world size": (
            ["train", c, "parallel.tp=2"],
            "world size 1 is not divisible by parallel.tp x parallel.pp x parallel.cp = 2 x 1 x 1",
        ),
        "context parallel with packing": (
            ["train", c, "parallel.cp=2", "data.packing=true"],
            "parallel.cp > 1 takes padded micro-batches",
        ),
        "context parallel with local attention": (
            ["train", c, "parallel.cp=2", "model.attention=local"],
            "parallel.cp > 1 needs RoPE and model.attention auto, te or sdpa",
        ),
        "shared prompt with context parallel": (
            ["train", c, "parallel.cp=2", "model.attention=sdpa", "data.share_prompt=true"],
            "data.share_prompt=true needs parallel.cp=1",
        ),
        "shared prompt with TE attention": (
            ["train", c, "model.attention=te", "data.share_prompt=true"],
            "data.share_prompt=true needs model.attention auto, sdpa or local",
        ),
        "fused RoPE with ALiBi": (
            ["train", c, "model.position_embedding=alibi", "model.fused_rope=true"],
            "model.fused_rope=true needs RoPE; model.position_embedding is alibi",
        ),
        "log-prob chunk of zero tokens": (
            ["train", c, "model.logprob_chunk_tokens=0"],
            "model.logprob_chunk_tokens must be > 0",
        ),
        "unknown loss": (["train", c, "dpo.loss_type=dpo2"], "dpo2"),
        "batch not divisible": (["train", c, "schedule.micro_batch_size=3"], "global_batch_size=4 is not divisible by"),
        "interleaved pipeline without PP": (["train", c, "parallel.vpp=2"], "parallel.vpp > 1 needs parallel.pp > 1"),
        "interleaved chunks not dividing layers": (
            ["train", c, "parallel.pp=2", "parallel.vpp=4"],
            "parallel.pp x parallel.vpp = 8 does not divide model.num_hidden_layers=4",
        ),
        # resuming: a run that would train on something else than its checkpoint's, a damaged checkpoint
        "resume with other train data": (
            [*resume, f"data.train_file={fewer}"],
            "this run differs from the checkpoint's in what it trains: train files train.jsonl",
        ),
        "resume with another seed": (
            [*resume, "schedule.seed=7"],
            "what it trains: schedule.seed 1234 -> 7; resume with the checkpoint's settings",
        ),
        "resume with another learning rate": ([*resume, "optimizer.lr=0.002"], "optimizer.lr 1e-06 -> 0.002; "),
        "resume with another global batch": (
            [*resume, "schedule.global_batch_size=8"],
            "schedule.global_batch_size 4 -> 8",
        ),
        "resume a damaged checkpoint by name": (
            ["train", c, f"checkpoint.resume={damaged}"],
            f"checkpoint.resume={damaged}: damaged checkpoint ({shard.name} has 100 bytes",
        ),
        "no intact checkpoint to resume": (
            ["train", c, f"logging.run_dir={every_damaged.parent}"],
            "no intact checkpoint to resume from: step_0000002 (.metadata has 0 bytes",
        ),
        "damaged checkpoint without a manifest": (
            [*resume, f"checkpoint.resume={unchecked}"],
            f"{unchecked}: cannot load checkpoint (CheckpointException: ",
        ),
        # today's families: what their config.json may hold that mdpo does not run
        "window layers without a window": (
            ["train", c, "model.sliding_window_layers=[0]"],
            "model.sliding_window_layers is set but model.sliding_window is null (the window's size)",
        ),
        "window on a layer the model lacks": (
            ["train", c, "model.sliding_window=8", "model.sliding_window_layers=[0, 9]"],
            "model.sliding_window_layers lists layer 9, not in 0..3",
        ),
        "unsupported rope type": (
            ["train", c, f"model.init_from={dynamic}"],
            "rope_type='dynamic' is not supported by mdpo's llama model (rope types: default, llama3, linear, yarn)",
        ),
        "unknown model family": (
            ["train", c, "model.family=foo"],
            f"model.family must be one of {', '.join(families.FAMILIES)}, got 'foo'",
        ),
        "unsupported architecture": (
            ["train", c, f"model.init_from={gemma}"],
            f"unsupported architecture GemmaForCausalLM; supported: {families.supported()}",
        ),
        "EP not dividing the experts": (
            ["train", c, on_moe, "parallel.ep=3"],
            "parallel.ep=3 does not divide the model's 4 experts",
        ),
        "EP on a dense model": (
            ["train", c, "parallel.ep=2"],
            "parallel.ep and parallel.etp > 1 need a mixture-of-experts model (this has none)",
        ),
        "MoE under TP with SP off": (
            ["train", c, on_moe, "parallel.tp=2", "parallel.sequence_parallel=false"],
            "parallel.tp=2 with a mixture-of-experts model needs parallel.sequence_parallel=true",
        ),
        "transformers' load-balancing loss with PP": (
            ["train", c, on_moe, "parallel.pp=2", "dpo.router_aux_loss_type=transformers"],
            "dpo.router_aux_loss_type=transformers with parallel.pp=2: transformers' loss pools the routing",
        ),
        "transformers' load-balancing loss with full recompute": (
            ["train", c, on_moe, "parallel.recompute=full", "dpo.router_aux_loss_type=transformers"],
            "dpo.router_aux_loss_type=transformers with recompute full",
        ),
        "unknown load-balancing loss": (
            ["train", c, on_moe, "dpo.router_aux_loss_type=global"],
            "dpo.router_aux_loss_type must be auto, transformers, megatron or seq, got 'global'",
        ),
        "MoE with shared experts": (
            ["train", c, f"model.init_from={shared_experts}"],
            "shared_expert_intermediate_size=64 (shared experts) is not supported by mdpo's qwen3_moe model",
        ),
        "Mixtral router jitter": (
            ["train", c, f"model.init_from={jitter}"],
            "router_jitter_noise=0.1 is not supported by mdpo's mixtral model",
        ),
        "expert tensor missing": (
            ["train", c, f"model.init_from={expert_missing}"],
            "HF checkpoint is missing tensor 'model.layers.2.mlp.experts.3.down_proj.weight'",
        ),
        "convert with EP not dividing the experts": (
            ["convert", "hf-to-megatron", "--hf", str(moe), "--out", str(root / "moe_ep3"), "--ep", "3"],
            "--ep 3 does not divide the model's 4 experts",
        ),
        "LoRA on the MLP of a mixture of experts": (
            ["train", c, f"model.init_from={mixtral_all_experts}", "lora.rank=4"],
            "lora.targets fc1, fc2 on a mixture-of-experts model: its experts take no adapters",
        ),
        "unknown rope scaling": (
            ["train", c, "model.init_from=null", "model.rope_scaling=longrope"],
            "model.rope_scaling must be null or llama3, linear, yarn, got 'longrope'",
        ),
        "tied head with NormHead": (
            ["train", c, "model.init_from=null", "model.tie_word_embeddings=true", "model.norm_head=true"],
            "model.tie_word_embeddings=true with model.norm_head=true",
        ),
        "LoRA rank below zero": (["train", c, "lora.rank=-1"], "lora.rank must be >= 0 (0: off), got -1"),
        "LoRA unknown target": (
            ["train", c, "lora.rank=4", "lora.targets=[qkv,lm_head]"],
            "unknown lora.targets entry 'lm_head'; valid: qkv, proj, fc1, fc2",
        ),
        "LoRA alpha not positive": (["train", c, "lora.rank=4", "lora.alpha=0"], "lora.alpha must be > 0, got 0"),
        "LoRA with TE attention": (
            ["train", c, "lora.rank=4", "model.attention=te"],
            "lora.rank > 0 needs model.attention auto, sdpa or local",
        ),
        "LoRA with TR-DPO": (
            ["train", c, "lora.rank=4", "dpo.sync_ref_model=true"],
            "lora.rank > 0 takes dpo.sync_ref_model=false",
        ),
        # data rows
        "malformed JSON": (
            ["train", c, f"data.train_file={write_rows(bad / 'a.jsonl', [good, '{oops'])}"],
            "a.jsonl:2: malformed JSON",
        ),
        "row without chosen": (
            ["train", c, f"data.train_file={write_rows(bad / 'b.jsonl', [good, {'prompt': 'p', 'rejected': 'r'}])}"],
            "b.jsonl:2: missing column 'chosen'",
        ),
        "empty response": (
            ["train", c, f"data.train_file={write_rows(bad / 'c.jsonl', [good, {**good, 'rejected': ' '}])}"],
            "c.jsonl:2: 'rejected' is empty",
        ),
        "identical responses": (
            ["train", c, f"data.train_file={write_rows(bad / 'd.jsonl', [good, {**good, 'rejected': '12'}])}"],
            "d.jsonl:2: chosen and rejected are identical",
        ),
        "data file missing": (
            ["train", c, f"data.train_file={root / 'nope.jsonl'}"],
            "nope.jsonl: data file not found",
        ),
        "fewer pairs than a batch": (
            ["train", c, f"data.train_file={write_rows(bad / 'e.jsonl', [good])}"],
            "1 usable pairs are fewer than one global batch",
        ),
        # empty or emptied inputs
        "empty data file": (
            ["train", c, f"data.train_file={empty / 'empty.jsonl'}"],
            "empty.jsonl: no rows (an empty data file)",
        ),
        "data file of blank lines": (
            ["train", c, f"data.train_file={empty / 'blank.jsonl'}"],
            "blank.jsonl: no rows (an empty data file)",
        ),
        "empty JSON array": (
            ["train", c, f"data.train_file={empty / 'empty.json'}"],
            "empty.json: no rows (an empty data file)",
        ),
        "empty parquet file": (
            ["train", c, f"data.train_file={empty / 'empty.parquet'}"],
            "empty.parquet: no rows (an empty data file)",
        ),
        "empty eval file": (
            ["train", c, f"data.eval_file={empty / 'empty.jsonl'}"],
            "empty.jsonl: no rows (an empty data file)",
        ),
        "folder of no data files": (["train", c, f"data.train_file={no_data}"], "notes: no data files in folder"),
        "every row skipped": (
            [
                "train",
                c,
                f"data.train_file={write_rows(bad / 'f.jsonl', [{**good, 'chosen': ''}] * 3)}",
                "data.on_bad_row=skip",
            ],
            "f.jsonl: no usable pairs (skipped: 'chosen' is empty: 3)",
        ),
        "every pair dropped by length": (
            ["train", c, f"data.train_file={write_rows(bad / 'g.jsonl', [long_row] * 2)}", "data.over_length=drop"],
            "g.jsonl: no usable pairs (dropped",
        ),
        # tokenizer vs model
        "tokenizer folder missing": (["train", c, f"data.tokenizer={root / 'no_tok'}"], "no_tok' does not exist"),
        "tokenizer larger than model vocab": (
            [
                "train",
                c,
                "model.init_from=null",
                "model.vocab_size=16",
                "model.hidden_size=32",
                "model.intermediate_size=64",
                "model.num_hidden_layers=2",
            ],
            "tokens but model.vocab_size is 16",
        ),
        # checkpoints
        "truncated safetensors": (["train", c, f"model.init_from={truncated}"], "cannot read safetensors file"),
        "wrong tensor shape": (
            ["train", c, f"model.init_from={wrong_shape}"],
            "tensor 'model.norm.weight' has shape (63,), the model config expects (64,)",
        ),
        "missing tensor": (
            ["train", c, f"model.init_from={missing}"],
            "missing tensor 'model.layers.1.mlp.up_proj.weight'",
        ),
        "no weights": (
            ["train", c, f"model.init_from={no_weights}"],
            "no *.safetensors or pytorch_model*.bin weights found",
        ),
        "incomplete checkpoint": (
            ["train", c, f"checkpoint.resume={incomplete}"],
            "not a complete mdpo checkpoint (no COMPLETE marker)",
        ),
        "reference cache missing": (
            ["train", c, "dpo.reference=precomputed", f"dpo.reference_cache={root / 'none'}"],
            "run `mdpo precompute-ref CONFIG.yaml` first",
        ),
        # output folders
        "run dir is a file": (
            ["train", c, f"logging.run_dir={root / 'a_file' / 'run'}"],
            "logging.run_dir: cannot write to",
        ),
        "read-only file system": (
            ["train", c, "logging.run_dir=/sys/mdpo_run"],
            "logging.run_dir: cannot write to /sys/mdpo_run",
        ),
        # mdpo eval
        "eval model folder missing": (
            ["eval", "--model", str(root / "no_model"), "--data", str(train)],
            "--model " + str(root / "no_model") + ": no such model folder",
        ),
        "eval data file missing": (
            [
                "eval",
                "--model",
                str(hf),
                "--data",
                str(root / "nope.jsonl"),
                "--reference-free",
                f"data.tokenizer={root / 'tok'}",
            ],
            "nope.jsonl: no such data file or folder",
        ),
        "eval empty data file": (
            [
                "eval",
                "--model",
                str(hf),
                "--data",
                str(empty / "empty.json"),
                "--reference-free",
                f"data.tokenizer={root / 'tok'}",
            ],
            "data.eval_file: " + str(empty / "empty.json") + ": no rows (an empty data file)",
        ),
        "eval model without tokenizer": (
            ["eval", "--model", str(hf), "--data", str(train), "--reference-free"],
            "holds no tokenizer files: pass data.tokenizer=FOLDER",
        ),
        "eval without a reference": (
            ["eval", "--model", str(hf), "--data", str(train), f"data.tokenizer={root / 'tok'}"],
            "no reference model recorded",
        ),
        "eval tokenizer larger than model vocab": (
            [
                "eval",
                "--model",
                str(small_vocab),
                "--data",
                str(train),
                "--reference-free",
                f"data.tokenizer={root / 'tok'}",
            ],
            "tokens but model.vocab_size is 24",
        ),
        "eval reference of another architecture": (
            [
                "eval",
                "--model",
                str(hf),
                "--data",
                str(train),
                "--reference",
                str(small_vocab),
                f"data.tokenizer={root / 'tok'}",
            ],
            "is another architecture than --model",
        ),
    }
    argvs = [argv for argv, _ in cases.values()]
    result = subprocess.run(
        [sys.executable, "-c", CLI_RUNNER, json.dumps(argvs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    return {name: (expected, *out) for (name, (_, expected)), out in zip(cases.items(), outputs)}


CASE_NAMES = [
    "unknown key",
    "wrong type",
    "malformed override",
    "YAML syntax",
    "missing required key",
    "TP not dividing heads",
    "Megatron-style flag",
    "overrides alone",
    "layout vs world size",
    "unknown loss",
    "batch not divisible",
    "malformed JSON",
    "row without chosen",
    "empty response",
    "identical responses",
    "data file missing",
    "fewer pairs than a batch",
    "tokenizer folder missing",
    "tokenizer larger than model vocab",
    "truncated safetensors",
    "wrong tensor shape",
    "missing tensor",
    "no weights",
    "incomplete checkpoint",
    "reference cache missing",
    "run dir is a file",
    "read-only file system",
    "context parallel with packing",
    "context parallel with local attention",
    "shared prompt with context parallel",
    "shared prompt with TE attention",
    "log-prob chunk of zero tokens",
    "empty data file",
    "data file of blank lines",
    "empty JSON array",
    "empty parquet file",
    "empty eval file",
    "folder of no data files",
    "every row skipped",
    "every pair dropped by length",
    "eval model folder missing",
    "eval data file missing",
    "eval empty data file",
    "eval model without tokenizer",
    "eval without a reference",
    "eval tokenizer larger than model vocab",
    "eval reference of another architecture",
    "LoRA rank below zero",
    "LoRA unknown target",
    "LoRA alpha not positive",
    "LoRA with TE attention",
    "LoRA with TR-DPO",
    "interleaved pipeline without PP",
    "interleaved chunks not dividing layers",
    "window layers without a window",
    "window on a layer the model lacks",
    "unsupported rope type",
    "unknown model family",
    "unsupported architecture",
    "EP not dividing the experts",
    "EP on a dense model",
    "MoE under TP with SP off",
    "transformers' load-balancing loss with PP",
    "transformers' load-balancing loss with full recompute",
    "unknown load-balancing loss",
    "MoE with shared experts",
    "Mixtral router jitter",
    "expert tensor missing",
    "convert with EP not dividing the experts",
    "LoRA on the MLP of a mixture of experts",
    "unknown rope scaling",
    "tied head with NormHead",
    "resume with other train data",
    "resume with another seed",
    "resume with another learning rate",
    "resume with another global batch",
    "resume a damaged checkpoint by name",
    "no intact checkpoint to resume",
    "damaged checkpoint without a manifest",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_clear_line(corpus, name):
    expected, code, stderr = corpus[name]
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("mdpo: error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert expected in lines[0], lines[0]


def test_each_bad_input_gets_its_own_message(corpus):
    """The product bug a corpus like this misses case by case: one catch-all message (a wrapper that turns every
    failure of a stage into the same line) still contains each expected fragment when the fragments are loose. So
    the error lines of all the cases must differ from one another, each naming its own cause."""
    firsts = {}
    for name, (_, _, stderr) in corpus.items():
        lines = [line for line in stderr.splitlines() if line.startswith("mdpo: error:")]
        firsts[name] = lines[0] if lines else None
    assert None not in firsts.values(), [name for name, line in firsts.items() if line is None]
    by_line = {}
    for name, line in firsts.items():
        by_line.setdefault(line, []).append(name)
    assert all(len(names) == 1 for names in by_line.values()), [names for names in by_line.values() if len(names) > 1]
