"""LoRA (`lora.rank > 0`) against independent oracles: PEFT loading RUN_DIR/adapter onto the HF base gives the logits
of RUN_DIR/hf (Llama through PEFT's own forward; Qwen 1.0 and Baichuan 2 13B, whose HF code is remote, merged by
PEFT onto a module tree of their HF names and run through the float64 oracles of `mdpo convert --check`), and
mdpo's own forward of the checkpoint (base + adapters, unmerged) gives the same; TP=2, PP=2 (full recompute),
DP=2 with the distributed optimizer and TP=2 with sequence parallelism equal one process; the base never moves
and checkpoints and optimizer hold the adapters only; a stopped and resumed run is bitwise the uninterrupted one;
refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CLI_RUNNER,
    REPO,
    baichuan_checkpoint,
    qwen_checkpoint,
    read_folder,
    run_mdpo,
    subprocess_env,
    tiny_hf_family,
    tiny_hf_llama,
    tiny_run_files,
)
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from mdpo.checkpoint.check import hf_logits
from mdpo.checkpoint.description import describe_model
from mdpo.checkpoint.dist import step_dir
from mdpo.config import DPOConfig

STEPS, RANK, ALPHA = 4, 4, 8.0
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    # full recompute: each layer's reentrant checkpoint, whose backward needs an input needing gradients
    "pp2_recompute_full": (2, ["parallel.pp=2", "parallel.recompute=full"]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),  # the interleaved pipeline: a layer per model chunk
    "tp2_sp_packed": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "data.packing=true"]),
}


# Today's families with what their adapters' mapping adds: GQA q/k/v split with a head size apart from hidden / heads
# (Qwen 3, Mistral), q/k/v biases and a tied head (Qwen 2.5), adapters under OLMo 2's and Gemma 3's norms; Llama
# 3.x has Llama 2's modules (the llama run).
# Megatron's MoE layers train under TP with SP; adapters on attention only (experts and, in PEFT's format, MoE
# models' MLPs take none); gpt-oss's biased experts whole on each rank (ETP = 1, EP = 1: its fc2 bias added in place
# after a size-one reduce-scatter, `megatron_cpu._copy_at_size_one`), adapters beside its q/k/v and output biases
MOE_NEEDS = {
    case: ["parallel.sequence_parallel=true", "lora.targets=[qkv, proj]"] for case in ("qwen3_moe", "deepseek_v3")
} | {"gpt_oss": ["parallel.sequence_parallel=true", "parallel.etp=1", "lora.targets=[qkv, proj]"]}
# the attention modules PEFT adapts: Llama's, or multi-latent attention's up projections (its down projections take
# no adapters) and output
ATTENTION_TARGETS = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
MLA_TARGETS = ["self_attn.kv_b_proj", "self_attn.o_proj", "self_attn.q_b_proj"]
TODAYS = (
    "qwen2.5_tied",
    "qwen3_tied",
    "mistral",
    "qwen3_moe",
    "olmo2",
    "gemma3_tied",
    "gemma3_multimodal_tied",
    "gpt_oss",
    "deepseek_v3",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama trained with LoRA in one process, in each of LAYOUTS, stopped after step 2 and resumed; and a
    Qwen 1.0 and a Baichuan 2 13B (ALiBi) trained at TP=2. Four steps of four pairs, two launches at a time.
    adam_eps 1e-2, above the gradients' elements (~3e-3): each layout sums in its own fp32 order, which leaves a
    nearly cancelling gradient element with a relative error of 1e-3, and Adam in its sign-like regime (eps 1e-8,
    every update ~lr whatever the gradient) carries that into the weights (measured at TP=2: 6e-5 and 1.5e-4
    relative on two B tensors of 56); with eps above the gradients the update follows the gradient (1.3e-6)."""
    root = tmp_path_factory.mktemp("lora")
    files = tiny_run_files(root, n_train=32, n_eval=4, data_seed=5, model_seed=5)
    config = {
        "model": {"init_from": str(files["hf"])},
        "data": {
            "train_file": str(files["train"]),
            "eval_file": str(files["eval"]),
            "tokenizer": str(files["tokenizer"]),
            "max_length": 64,
        },
        "schedule": {"global_batch_size": 4, "micro_batch_size": 2, "train_steps": STEPS, "warmup_ratio": 0.0},
        "optimizer": {"lr": 1e-2, "adam_eps": 1e-2},
        "lora": {"rank": RANK, "alpha": ALPHA},
        "logging": {"progress": False, "plot": False},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    bases = {
        "llama": files["hf"],
        "qwen": qwen_checkpoint(root / "qwen_hf"),
        "baichuan13b": baichuan_checkpoint(root / "baichuan13b_hf"),
    }
    vocab = json.loads((files["hf"] / "config.json").read_text())["vocab_size"]
    for case in TODAYS:
        bases[case] = root / f"{case}_hf"
        tiny_hf_family(case, seed=5, vocab_size=vocab).save_pretrained(bases[case])

    def train(run: str, *overrides: str, nproc: int = 1) -> str:
        result = run_mdpo(["train", str(root / "c.yaml"), f"logging.run_dir={root / run}", *overrides], nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    jobs = [("tp1", 1, []), ("stopped", 1, ["schedule.exit_interval=2"])]
    jobs += [(name, nproc, args) for name, (nproc, args) in LAYOUTS.items()]
    jobs += [
        (family, 2, ["parallel.tp=2", f"model.init_from={bases[family]}", *MOE_NEEDS.get(family, [])])
        for family in ("qwen", "baichuan13b", *TODAYS)
    ]
    with ThreadPoolExecutor(2) as pool:  # two cores: the launches of each pair share them
        done = [pool.submit(train, name, *args, nproc=nproc) for name, nproc, args in jobs]
        assert "stopped after step 2" in done[1].result()
        resumed = pool.submit(train, "stopped")
        for job in done:
            job.result()
        assert "resumed from" in resumed.result()
    return {"root": root, "bases": bases, **{name: root / name for name, _, _ in jobs}}


# What layouts may change in a reward: it is beta x (policy - reference log-prob), and those log-probs are fp32 sums
# (~27 here) that each layout adds up in its own order, a few units in their last place apart (2e-6 each): measured
# 1e-6 in logps/chosen and so 1.4e-7 in a reward of 0.0013. Rewards are checked to 1e-6 x beta of the log-probs'
# size (5e-6 here; the logps themselves to 1e-5 of their value, the adapters to 1e-5 of their norm).
REWARD_RESOLUTION = 1e-6 * DPOConfig().beta


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("tokens_per_second", None)  # wall-clock
        record.pop("peak_memory_gib", None)  # process memory
    return records


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------ PEFT as the oracle


def peft_merged(base: Path, adapter_dir: Path, out: Path) -> Path:
    """PEFT's reading of the adapter folder: its LoRA layers injected into a module tree of the base's HF names (a
    Linear per weight), its state dict loaded, each layer's delta computed by PEFT and added; written as a HF
    folder (the base's config.json) for the family's independent forward."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    state = read_folder(base)
    tree = torch.nn.Module()
    for name, tensor in state.items():
        if tensor.dim() != 2:
            continue
        owner = tree
        *path, leaf, _ = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        linear = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
        linear.weight.data = tensor.clone()
        owner.add_module(leaf, linear)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    tree = inject_adapter_in_model(config, tree)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = set_peft_model_state_dict(tree, {k.removeprefix("base_model.model."): v for k, v in tensors.items()})
    assert not loaded.unexpected_keys, loaded.unexpected_keys[:3]
    merged, adapted = dict(state), 0
    for name, module in tree.named_modules():
        if isinstance(module, LoraLayer):
            merged[f"{name}.weight"] = state[f"{name}.weight"] + module.get_delta_weight("default")
            adapted += 1
    assert adapted == len(tensors) // 2
    out.mkdir()
    save_file(merged, str(out / "model.safetensors"))
    (out / "config.json").write_text((base / "config.json").read_text())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen", "baichuan13b"])
def test_peft_adapter_gives_the_merged_export_and_mdpos_forward(runs, tmp_path, family):
    run, base = runs["tp1" if family == "llama" else family], runs["bases"][family]
    model = describe_model({"init_from": str(run / "hf")})
    tokens = torch.randint(0, 80, (2, 20), generator=torch.Generator().manual_seed(1))
    exported = torch.stack(hf_logits(run / "hf", model, tokens.tolist()))
    if family == "llama":  # PEFT's own forward on the HF model
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base).double().eval(), run / "adapter")
        with torch.no_grad():
            ours = peft(tokens).logits
            with peft.disable_adapter():
                untouched = peft(tokens).logits
    else:
        ours = torch.stack(hf_logits(peft_merged(base, run / "adapter", tmp_path / "merged"), model, tokens.tolist()))
        untouched = torch.stack(hf_logits(base, model, tokens.tolist()))
    assert (ours - exported).abs().max().item() <= 1e-4, family
    assert (ours - untouched).abs().max().item() > 1e-3, family  # the adapters moved the logits
    # mdpo's own forward of the last checkpoint (the base, then the adapters, unmerged) against the merged export
    result = run_mdpo(
        [
            "convert",
            "megatron-to-hf",
            "--ckpt",
            str(step_dir(run / "checkpoints", STEPS)),
            "--out",
            str(tmp_path / "converted"),
            "--check",
            "--check-rows",
            "2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.endswith(": ok") and "check: 2 rows" in line for line in result.stdout.splitlines())
    assert torch.equal(
        torch.cat([t.flatten() for t in read_folder(tmp_path / "converted").values()]),
        torch.cat([t.flatten() for t in read_folder(run / "hf").values()]),
    )


@pytest.mark.parametrize("case", TODAYS)
def test_peft_on_transformers_class_gives_the_merged_export(runs, case):
    """Today's families (trained at TP=2): PEFT's own forward with the adapter on transformers' class of the base
    gives the merged export's logits, which transformers' class reads with the base's config.json unchanged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, base = runs[case], runs["bases"][case]
    assert json.loads((run / "hf" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    tokens = torch.randint(0, 80, (2, 20), generator=torch.Generator().manual_seed(1))
    load = lambda folder: AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").double().eval()
    peft = PeftModel.from_pretrained(load(base), run / "adapter")
    exported = load(run / "hf")
    with torch.no_grad():
        ours, merged = peft(tokens).logits, exported(tokens).logits
        with peft.disable_adapter():
            untouched = peft(tokens).logits
    assert (ours - merged).abs().max().item() <= 1e-4, case
    assert (ours - untouched).abs().max().item() > 1e-3, case  # the adapters moved the logits
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    mlp = [] if case in MOE_NEEDS else ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    attention = MLA_TARGETS if case == "deepseek_v3" else ATTENTION_TARGETS
    assert config["target_modules"] == [*mlp, *attention]


def test_adapter_config_names_the_familys_modules(runs):
    configs = {f: json.loads((runs[f] / "adapter" / "adapter_config.json").read_text()) for f in ("tp1", "qwen")}
    assert configs["tp1"]["target_modules"] == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    assert configs["qwen"]["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_proj", "mlp.w1", "mlp.w2"]
    assert configs["tp1"]["r"] == RANK and configs["tp1"]["lora_alpha"] == ALPHA
    assert configs["tp1"]["base_model_name_or_path"] == str(runs["bases"]["llama"])


# ------------------------------------------------------------------ layouts, frozen base, resume


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_process(runs, layout):
    one, other = metrics(runs["tp1"]), metrics(runs[layout])
    assert len(one) == len(other) == STEPS + 2  # the initial and final evaluations too
    for a, b in zip(one, other):
        for key in (
            "loss",
            "eval_loss",
            "rewards/chosen",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
        ):
            if key in a:
                tolerance = max(1e-5 * abs(a[key]), 1e-7)
                if key.startswith("rewards/"):  # beta x (logp - ref logp): differences of fp32 sums of ~27
                    tolerance = max(tolerance, REWARD_RESOLUTION * (abs(a["logps/chosen"]) + abs(a["logps/rejected"])))
                assert b[key] == pytest.approx(a[key], rel=0, abs=tolerance), (a.get("step"), key)
    want, got = adapter(runs["tp1"]), adapter(runs[layout])
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        error = ((got[name] - tensor).norm() / tensor.norm()).item()
        assert error <= 1e-5, (name, error)


def test_training_moves_the_adapters_only(runs):
    """The export's unadapted tensors are the base's, bitwise; each adapted weight is the base's plus
    (alpha / r) B A of the exported adapter (float64); the checkpoints and the distributed optimizer's state hold
    adapter tensors only."""
    base, merged = read_folder(runs["bases"]["llama"]), read_folder(runs["tp1"] / "hf")
    tensors = adapter(runs["tp1"])
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    assert len(adapted) == 7 * 4
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module not in adapted:
            assert torch.equal(merged[name], weight), name
            continue
        a, b = (tensors[f"base_model.model.{module}.lora_{x}.weight"].double() for x in "AB")
        delta = merged[name].double() - weight.double()
        assert b.abs().max() > 0 and torch.allclose(delta, ALPHA / RANK * b @ a, atol=1e-6), name
    for run, count in (("tp1", 8 * 3), ("dp2_distopt", 8 * 4)):  # the 8 adapters (layers stacked) and Adam's moments
        keys = FileSystemReader(str(step_dir(runs[run] / "checkpoints", STEPS))).read_metadata().state_dict_metadata
        tensors = [k for k in keys if not k.startswith(("rng_state", "common_state"))]  # 0.19: common_state
        assert len(tensors) == count and all(k.endswith((".lora_A", ".lora_B")) for k in tensors), (run, tensors)


def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(runs):
    assert metrics(runs["stopped"]) == metrics(runs["tp1"])
    want, got = adapter(runs["tp1"]), adapter(runs["stopped"])
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ refusals, one line each


def test_lora_checkpoints_are_refused_where_they_do_not_fit(runs, tmp_path):
    root = runs["root"]
    other = tmp_path / "other_base"
    tiny_hf_llama(
        seed=9, vocab_size=json.loads((runs["bases"]["llama"] / "config.json").read_text())["vocab_size"]
    ).save_pretrained(other)
    ckpt = step_dir(runs["tp1"] / "checkpoints", STEPS)
    c = str(root / "c.yaml")
    more = f"schedule.train_steps={STEPS + 2}"
    cases = [
        (
            ["train", c, f"logging.run_dir={runs['tp1']}", f"model.init_from={other}", more],
            f"{ckpt}: its adapters belong to the base model {runs['bases']['llama']}",
        ),
        (
            ["train", c, f"logging.run_dir={runs['tp1']}", "lora.rank=0", more],
            f"{ckpt}: saved by a LoRA run (it holds adapters only), now lora.rank=0",
        ),
        (
            ["train", c, f"logging.run_dir={tmp_path / 'new'}", f"model.init_from={ckpt}", "lora.rank=0"],
            f"{ckpt}: a LoRA checkpoint holds its adapters only; export it merged",
        ),
        (["convert", "hf-to-megatron", "--hf", str(other), "--out", str(tmp_path / "full")], None),
        (
            ["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "full"), "--out", str(tmp_path / "x"), "--adapter"],
            f"{tmp_path / 'full'}: --adapter needs a LoRA run's checkpoint (lora.rank > 0); this one holds full "
            "weights",
        ),
    ]
    result = subprocess.run(
        [sys.executable, "-c", CLI_RUNNER, json.dumps([argv for argv, _ in cases])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for (argv, expected), (code, stderr) in zip(cases, json.loads(result.stdout.strip().splitlines()[-1])):
        if expected is None:
            assert code == 0, stderr[-2000:]
            continue
        lines = [line for line in stderr.splitlines() if line.startswith("mdpo: error:")]
        assert code == 2 and "Traceback" not in stderr and len(lines) == 1, (argv, code, stderr[-2000:])
        assert expected in lines[0], lines[0]
    assert len(list((runs["tp1"] / "checkpoints").iterdir())) == 1  # nothing written by the refused resumes


# ------------------------------------------------------------------ the adapter layers themselves


def test_fresh_adapters_leave_the_forward_unchanged_and_switch_off(megatron_world):
    """B = 0 (PEFT's init): the adapted model's logits are the base's bitwise; with B set, `adapters_off` gives the
    base back bitwise and the adapters on give base + the float64 delta through one layer's output; A is PEFT's
    Kaiming-uniform (bound 1/sqrt(in)) and the same whatever the layout (drawn whole from its own generator)."""
    from mdpo.config import LoRAConfig, ModelConfig
    from mdpo.models.gpt import build_gpt_model, transformer_config
    from mdpo.models.lora import adapted_layers, adapters_off, init_adapters, initial_A

    model = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    gpt = build_gpt_model(model, transformer_config(model)).eval()
    torch.manual_seed(0)  # the same base weights, built with the adapters in its spec (they draw nothing)
    adapted = build_gpt_model(model, transformer_config(model), lora=LoRAConfig(rank=4, alpha=8.0)).eval()
    tokens = torch.randint(0, 64, (2, 10))
    inputs = dict(input_ids=tokens, position_ids=torch.arange(10)[None].expand(2, -1), attention_mask=None)
    with torch.no_grad():
        base = gpt(**inputs)
        gpt = init_adapters(adapted, seed=3)
        assert torch.equal(gpt(**inputs), base)
        layers = adapted_layers(gpt)
        assert len(layers) == 8 and all(not p.requires_grad for n, p in gpt.named_parameters() if "lora" not in n)
        for layer in layers:
            layer.lora_B.normal_(0, 0.1)
        with adapters_off([gpt]):
            assert torch.equal(gpt(**inputs), base)
        assert (gpt(**inputs) - base).abs().max() > 1e-3
    proj = gpt.decoder.layers[1].self_attention.linear_proj
    x = torch.randn(10, 2, 32)
    with torch.no_grad():
        out, _ = proj(x)
        want = x.double() @ proj.weight.double().T + 2.0 * x.double() @ proj.lora_A.double().T @ proj.lora_B.double().T
    assert torch.allclose(out.double(), want, atol=1e-5)
    a = initial_A(4, 32, seed=3, layer=1, target="proj")
    assert torch.equal(a, proj.lora_A) and a.abs().max() <= 32**-0.5 and a.std() > 0.5 * 32**-0.5 / 3**0.5
