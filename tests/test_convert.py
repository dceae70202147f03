"""HF <-> Megatron converters for every registered family (`mdpo.models.families.FAMILIES`), against independent
oracles (the families' own, those of `mdpo convert --check`: transformers' classes for the families it has, and
for Qwen 1.0 and Baichuan 2 (7B RoPE, 13B ALiBi), whose model code is remote, float64 stand-ins in
mdpo/models/families/oracles.py; they share nothing with the mapping tables)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FAMILY_CASES,
    REMOTE_CHECKPOINTS,
    REPO,
    VOCAB,
    baichuan_checkpoint,
    qwen_checkpoint,
    read_folder,
    run_mdpo,
    tiny_hf_family,
    tiny_hf_llama,
)
from safetensors.torch import load_file, save_file

from mdpo.checkpoint.check import hf_logits
from mdpo.checkpoint.description import describe_model
from mdpo.models import families

# --------------------------------------------------------------------------- fixtures

# How a case is converted when not at TP=2 x PP=2 (four writer processes): in parts by one process (a part per HF
# shard: their sources have shards of about one layer; MoE experts are saved per layer, the other tensors stacked
# over the layers), Mixtral at EP=2 x PP=2 (each rank reading its experts only), Baichuan 7B-style with RoPE at 1 x 1.
LAYOUTS = {
    "qwen_parts": [],
    "qwen3_moe_unnormed": [],
    "mixtral": ["--ep", "2", "--pp", "2"],
    "baichuan7b": ["--position-embedding", "rope"],
}
PARTS = ("qwen_parts", "qwen3_moe_unnormed")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """case -> (HF source, Megatron checkpoint, HF folder converted back), for the tiny checkpoints of every
    registered family: conftest.FAMILY_CASES (saved by transformers' own classes), a Qwen 1.0 (in 100 KB shards, also
    converted in parts) and a Baichuan 2 13B- and 7B-style. HF -> Megatron with `--check` (the family's oracle) at
    the case's layout, then back to HF."""
    root = tmp_path_factory.mktemp("convert")
    sources = {case: root / case for case in FAMILY_CASES}
    for case, folder in sources.items():
        shard = "100KB" if case in PARTS else "5GB"
        tiny_hf_family(case, seed=5, vocab_size=VOCAB).save_pretrained(folder, max_shard_size=shard)
    sources["qwen"] = sources["qwen_parts"] = qwen_checkpoint(root / "qwen")
    sources["baichuan13b"] = baichuan_checkpoint(root / "baichuan13b")
    sources["baichuan7b"] = baichuan_checkpoint(root / "baichuan7b", heads=4, seed=5)
    out = {}
    for case, src in sources.items():
        mc, back = root / f"{case}_mc", root / f"{case}_back"
        layout = LAYOUTS.get(case, ["--tp", "2", "--pp", "2"])
        check = ["--check", "--check-rows", "2"]
        result = run_mdpo(["convert", "hf-to-megatron", "--hf", str(src), "--out", str(mc), *layout, *check])
        assert result.returncode == 0, result.stderr[-3000:]
        checked = [line for line in result.stdout.splitlines() if "check: 2 rows" in line]
        assert len(checked) == 1 and checked[0].endswith(": ok"), result.stdout  # the self-check ran and passed
        result = run_mdpo(["convert", "megatron-to-hf", "--ckpt", str(mc), "--out", str(back)])
        assert result.returncode == 0, result.stderr[-3000:]
        out[case] = (src, mc, back)
    for case in PARTS:
        assert len(list((root / f"{case}_mc").glob("part*.distcp"))) > 2, case  # really written in several parts
    assert len(list(sources["qwen"].glob("*.safetensors"))) > 1  # the Qwen source was sharded with an index
    return out


def _description(mc: Path) -> dict:
    return json.loads((mc / "mdpo_model.json").read_text())["model"]


def test_every_registered_family_has_a_tiny_checkpoint():
    """Each family of the registry has a test fixture: a tiny checkpoint made by transformers' own class (the
    family's oracle) where transformers has one (conftest.FAMILY_CASES), else a hand-written one
    (conftest.REMOTE_CHECKPOINTS); and no fixture names a family the registry does not hold."""
    made_by_transformers = {family for family, _ in FAMILY_CASES.values()}
    for name, family in families.FAMILIES.items():
        fixtures = made_by_transformers if isinstance(family.oracle, str) else set(REMOTE_CHECKPOINTS)
        assert name in fixtures, f"family {name} has no tiny checkpoint in tests/conftest.py"
    assert made_by_transformers | set(REMOTE_CHECKPOINTS) == set(families.FAMILIES)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_round_trip_is_bitwise(converted, family):
    """HF -> Megatron (at TP=2 x PP=2, EP=2 x PP=2 or in parts) -> HF, for every registered family: every tensor
    bitwise (a tied model's files hold no head either way; a NormHead, Baichuan's, comes back with its rows
    normalised, folded in on import: bitwise that normalisation), config.json unchanged (RoPE scaling, tie,
    head_dim, architecture) and the source's other files (generation config, tokenizer, remote code) kept."""
    cases = {case: paths for case, paths in converted.items() if _description(paths[1])["family"] == family}
    assert cases, f"no tiny checkpoint of family {family} was converted"
    normalised = {hf[0] for _, hf, kind in families.get(family).global_tensors if kind == "norm_vocab"}
    for case, (src, _, back) in cases.items():
        original, returned = read_folder(src), read_folder(back)
        assert sorted(original) == sorted(returned), case
        for name, tensor in original.items():
            expected = F.normalize(tensor.float(), dim=-1) if name in normalised else tensor
            assert torch.equal(expected, returned[name]), (case, name)
        assert ("lm_head.weight" in returned) == ("tied" not in case), case
        assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text()), case
        weights = lambda name: name.endswith(".safetensors") or name == "model.safetensors.index.json"
        kept = {file.name for file in src.iterdir() if not weights(file.name)}
        assert kept <= {file.name for file in back.iterdir()}, case
        assert not list(back.glob("*.distcp")) and not (back / "mdpo_model.json").exists(), case


def test_descriptions_follow_config_json(converted):
    """The description a conversion stores says what config.json says."""
    model = {case: _description(mc) for case, (_, mc, _) in converted.items()}
    assert model["llama3.1"]["rope_scaling"] == "llama3" and model["llama3.1"]["rope_low_freq_factor"] == 0.5
    assert model["llama3.1"]["rope_original_max_position_embeddings"] == 64 and not model["llama3.1"]["qk_norm"]
    assert model["llama3.1"]["num_key_value_heads"] == 2 and model["llama3.1"]["family"] == "llama"
    assert model["qwen3_tied"]["qk_norm"] and model["qwen3_tied"]["head_dim"] == 32
    assert model["qwen3_tied"]["tie_word_embeddings"] and model["qwen2.5_tied"]["qkv_bias"]
    assert model["mistral"]["family"] == "mistral" and model["mistral"]["head_dim"] == 32
    assert model["qwen2.5"]["head_dim"] is None  # hidden / heads: the default, however config.json spells it
    assert model["qwen"]["intermediate_size"] == 96 and model["qwen"]["qkv_bias"] is True
    assert model["qwen"]["rms_norm_eps"] == 1e-6
    assert model["baichuan13b"]["position_embedding"] == "alibi" and model["baichuan13b"]["norm_head"] is True
    assert model["baichuan7b"]["position_embedding"] == "rope"
    for case in ("olmo2", "olmo3"):
        assert model[case]["norm_position"] == "post" and model[case]["qk_norm_span"] == "projection", case
    assert model["olmo3"]["sliding_window"] == 6 and model["olmo3"]["sliding_window_layers"] == [0, 1, 2]
    assert model["qwen2_moe"]["shared_expert_intermediate_size"] == 80 and model["qwen2_moe"]["moe_layers"] == [0, 2, 3]
    assert model["qwen2_moe"]["sliding_window_layers"] == [0, 2] and model["qwen2_moe"]["qkv_bias"]
    gpt_oss = model["gpt_oss"]
    assert gpt_oss["attention_sinks"] and gpt_oss["linear_bias"] and gpt_oss["qkv_bias"] and gpt_oss["num_experts"] == 4
    assert gpt_oss["hidden_act"] == "quick_gelu" and gpt_oss["glu_clamp"] == 0.5 and gpt_oss["glu_linear_offset"] == 1
    assert gpt_oss["sliding_window_layers"] == [0, 2] and gpt_oss["rope_scaling"] == "yarn"
    glm = model["glm4_moe"]  # transformers' class writes partial_rotary_factor into rope_parameters
    assert glm["partial_rotary_factor"] == 0.5 and glm["qkv_bias"] and glm["qk_norm"] and glm["head_dim"] == 32
    assert glm["moe_layers"] == [1, 2, 3] and glm["shared_expert_intermediate_size"] == 32
    assert glm["router_groups"] == 2 and glm["router_group_topk"] == 1 and glm["routed_scaling_factor"] == 2.5
    assert glm["router_score"] == "sigmoid" and glm["router_expert_bias"] and not glm["shared_expert_gate"]
    written = json.loads((converted["qwen2_moe"][0] / "config.json").read_text())
    del written["layer_types"]  # transformers 4 wrote none: transformers 5 then takes every other layer below 3
    assert families.get("qwen2_moe").read_config(written)["sliding_window_layers"] == [0, 2]


@pytest.mark.parametrize(
    ("case", "tensor"),
    [
        ("llama3.2_tied", "model.embed_tokens.weight"),
        ("qwen3_tied", "model.layers.3.self_attn.k_norm.weight"),
        ("llama3.1", "model.layers.2.mlp.down_proj.weight"),
    ],
)
def test_check_fails_on_one_wrong_tensor(converted, tmp_path, case, tensor):
    """`--check` against a copy of the source folder with one tensor changed by 1%: the conversion check fails."""
    import shutil

    from mdpo import startup
    from mdpo.checkpoint.check import check_conversion
    from mdpo.errors import MdpoError

    src, mc, _ = converted[case]
    wrong = shutil.copytree(src, tmp_path / "wrong")
    _edit(wrong, add={tensor: read_folder(src)[tensor] * 1.01})
    startup.prepare()  # the command line's CPU patches: check_conversion runs in this process
    with pytest.raises(MdpoError, match="conversion check failed"):
        check_conversion(wrong, mc, describe_model({"init_from": str(mc)}), None, 2)


ORACLE_CASES = ("llama3.1", "qwen", "qwen_parts", "baichuan13b", "baichuan7b")


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_equal_independent_oracles(converted, tmp_path, tp):
    """mdpo's forward on converted checkpoints at TP=1 and TP=2 == the family's oracle (fp32, <= 1e-4)."""
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    ckpts = [str(converted[case][1]) for case in ORACLE_CASES]
    worker = REPO / "tests" / "workers" / "convert_logits.py"
    result = run_mdpo([str(worker), str(tmp_path / "logits.pt"), str(tmp_path / "tokens.pt"), *ckpts], nproc=tp)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")
    for case in ORACLE_CASES:
        src, mc, _ = converted[case]
        oracle = torch.stack(hf_logits(src, describe_model({"init_from": str(mc)}), tokens.tolist())).double()
        ours = logits[str(mc)].double()
        assert ours.shape == oracle.shape, case
        err = (ours - oracle).abs().max().item()
        assert err <= 1e-4, f"{case} at TP={tp}: max abs logit error {err}"
        assert oracle.std() > 0.05  # the logits are far from constant: a wrong mapping would show


# --------------------------------------------------------------------------- errors


def convert_error(tmp_path: Path, src: Path, *extra: str) -> str:
    from mdpo.checkpoint.convert import hf_to_megatron
    from mdpo.errors import MdpoError

    args = dict(zip(extra[::2], extra[1::2]))
    with pytest.raises(MdpoError) as info:
        hf_to_megatron(src, tmp_path / "out", tp=int(args.get("tp", 1)), pp=int(args.get("pp", 1)))
    assert not (tmp_path / "out").exists()
    return str(info.value)


def _edit(folder: Path, drop: str | None = None, add: dict | None = None, reshape: str | None = None) -> Path:
    file = folder / "model.safetensors"
    state = load_file(file)
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = torch.zeros(state[reshape].shape[0] + 1, *state[reshape].shape[1:])
    state.update(add or {})
    save_file(state, file)
    return folder


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
        ("shared_expert", "missing tensor 'model.layers.2.mlp.shared_expert_gate.weight'"),
        ("extra", "unexpected tensor 'model.layers.0.mlp.bias'"),
        ("shape", "tensor 'model.layers.0.mlp.up_proj.weight' has shape (97, 64), the model config expects (96, 64)"),
        ("tp", "--tp 3 does not divide the attention heads (4 query, 2 key/value)"),
        ("pp", "--pp 3 does not divide the 4 layers"),
        ("family", "the tensors are those of a QWenLMHeadModel checkpoint, config.json says llama"),
        ("truncated", "model.safetensors: cannot read safetensors file"),
        (
            "architecture",
            "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM (llama), "
            "QWenLMHeadModel (qwen), Qwen2ForCausalLM (qwen2), Qwen3ForCausalLM (qwen3), MistralForCausalLM "
            "(mistral), BaichuanForCausalLM (baichuan)",
        ),
        ("megatron", "is already a Megatron checkpoint"),
    ],
)
def test_conversion_errors_name_the_problem(tmp_path, case, expected):
    src = tmp_path / "hf"
    model = (
        tiny_hf_family("qwen2_moe", vocab_size=VOCAB) if case == "shared_expert" else tiny_hf_llama(vocab_size=VOCAB)
    )
    model.save_pretrained(src)
    extra: tuple[str, ...] = ()
    if case == "missing":
        _edit(src, drop="model.layers.1.self_attn.k_proj.weight")
    elif case == "shared_expert":
        _edit(src, drop="model.layers.2.mlp.shared_expert_gate.weight")
    elif case == "extra":
        _edit(src, add={"model.layers.0.mlp.bias": torch.zeros(3)})
    elif case == "shape":
        _edit(src, reshape="model.layers.0.mlp.up_proj.weight")
    elif case in ("tp", "pp"):
        extra = (case, "3")
    elif case == "family":
        qwen = qwen_checkpoint(tmp_path / "qwen")
        for file in qwen.glob("*.safetensors*"):
            file.rename(src / file.name)
        (src / "model.safetensors").unlink()
    elif case == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "architecture":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(
            json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
        )
    elif case == "megatron":
        (src / "mdpo_model.json").write_text('{"format": "mdpo-megatron", "model": {}}')
    message = convert_error(tmp_path, src, *extra)
    assert expected in message, message


def test_an_export_without_the_carried_tensors_is_one_line(converted, tmp_path):
    """A multimodal Gemma 3 checkpoint keeps its vision tower (carried.safetensors) for its exports: gone, the export
    stops in one line naming the folder it looked in."""
    mc = tmp_path / "mc"
    shutil.copytree(converted["gemma3_multimodal_tied"][1], mc)
    (mc / "carried.safetensors").unlink()
    result = run_mdpo(["convert", "megatron-to-hf", "--ckpt", str(mc), "--out", str(tmp_path / "hf")])
    line = (
        f"mdpo: error: a Gemma3ForConditionalGeneration export carries its untrained tensors (vision_tower.*, "
        f"multi_modal_projector.*) from the source folder {mc}, which holds none"
    )
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [line], result.stderr[-2000:]
    assert not (tmp_path / "hf").exists()


def test_cli_error_is_one_line_and_mdpo_debug_adds_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["convert", "hf-to-megatron", "--hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    result = run_mdpo(argv)
    line = f"mdpo: error: {tmp_path / 'nothing'}: no config.json (expected a HF model folder)"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line]
    from mdpo.cli import main

    monkeypatch.setenv("MDPO_DEBUG", "1")
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == line and lines[1] == "Traceback (most recent call last):" and "MdpoError" in lines[-1]


# --------------------------------------------------------------------------- training from and to checkpoints


def test_training_from_a_converted_checkpoint(tmp_path):
    """`model.init_from` at a converted checkpoint (written at TP=1, trained at TP=2) trains exactly as from the HF
    folder, and `megatron-to-hf` of the run's training checkpoint equals the run's own HF export."""
    import yaml
    from conftest import tiny_run_files

    files = tiny_run_files(tmp_path, n_train=16, n_eval=0, data_seed=2, model_seed=6)
    result = run_mdpo(["convert", "hf-to-megatron", "--hf", str(files["hf"]), "--out", str(tmp_path / "mc")])
    assert result.returncode == 0, result.stderr[-3000:]
    config = {
        "data": {"train_file": str(files["train"]), "tokenizer": str(files["tokenizer"]), "max_length": 64},
        "schedule": {"global_batch_size": 8, "micro_batch_size": 4, "train_steps": 2, "warmup_ratio": 0.0},
        "optimizer": {"lr": 1e-3},
        "logging": {"progress": False, "plot": False},
        "parallel": {"tp": 2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    runs = {}
    for name, source in (("from_hf", files["hf"]), ("from_mc", tmp_path / "mc")):
        run = tmp_path / name
        result = run_mdpo(
            [
                "train",
                str(tmp_path / "config.yaml"),
                f"model.init_from={source}",
                f"logging.run_dir={run}",
                f"checkpoint.dir={run / 'ckpt'}",
            ],
            nproc=2,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["from_hf"], runs["from_mc"], strict=True):
        assert a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]
    step = tmp_path / "from_mc" / "ckpt" / "step_0000002"
    result = run_mdpo(["convert", "megatron-to-hf", "--ckpt", str(step), "--out", str(tmp_path / "back")])
    assert result.returncode == 0, result.stderr[-3000:]
    exported, converted = read_folder(tmp_path / "from_mc" / "hf"), read_folder(tmp_path / "back")
    assert sorted(exported) == sorted(converted)
    assert all(torch.equal(exported[name], converted[name]) for name in exported)
    original = read_folder(files["hf"])
    assert not torch.equal(original["lm_head.weight"], converted["lm_head.weight"])  # training moved the weights


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
    """A bf16 checkpoint (Megatron keeps its norms in fp32) comes back bf16 and bitwise equal."""
    tiny_hf_llama(seed=2, vocab_size=VOCAB, num_hidden_layers=2).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    for args in (
        ["hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mc")],
        ["megatron-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "back")],
    ):
        result = run_mdpo(["convert", *args])
        assert result.returncode == 0, result.stderr[-3000:]
    original, returned = read_folder(tmp_path / "hf"), read_folder(tmp_path / "back")
    assert sorted(original) == sorted(returned)
    for name, tensor in original.items():
        assert tensor.dtype == torch.bfloat16 and returned[name].dtype == torch.bfloat16, name
        assert torch.equal(tensor, returned[name]), name


def test_dcp_merge_edits_the_metadata_this_torch_writes():
    """`checkpoint.dcp_merge` rewrites torch.distributed.checkpoint's metadata by hand (the parts writer's round trip
    above proves the result loads). Pinned here: the torch versions that was checked on, and the fields it edits,
    so a torch upgrade fails this test before it breaks a conversion."""
    import dataclasses

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    from mdpo.checkpoint import dcp_merge

    assert ".".join(torch.__version__.split(".")[:2]) in dcp_merge.CHECKED_TORCH, torch.__version__
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}
    assert {"state_dict_metadata", "storage_data"} <= fields(Metadata)
    assert {"size", "chunks"} <= fields(TensorStorageMetadata)
    assert fields(ChunkStorageMetadata) == {"offsets", "sizes"}
    assert {"fqn", "offset"} <= fields(MetadataIndex)
    assert "relative_path" in fields(_StorageInfo)
    # MetadataIndex hashes by name and offset only: the merge re-keys moved chunks by building new ones
    assert MetadataIndex("a", torch.Size([1, 0])) == MetadataIndex("a", torch.Size([1, 0]), index=3)


def test_check_uses_the_users_rows_both_ways_and_fails_on_another_model(tmp_path):
    """`--check --check-data`: prompt + chosen of the data file's pairs, tokenized with the folder's tokenizer, on the
    way in and on the way back; and the check fails (exit 2, one line) when the weights are not the folder's."""
    import shutil

    from conftest import tiny_run_files

    from mdpo import startup
    from mdpo.checkpoint.check import check_conversion
    from mdpo.errors import MdpoError

    files = tiny_run_files(tmp_path, n_train=8, n_eval=0, data_seed=4, model_seed=7)
    for item in files["tokenizer"].iterdir():  # a HF model folder carries its tokenizer
        shutil.copy(item, files["hf"] / item.name)
    check = ["--check", "--check-data", str(files["train"]), "--check-rows", "3"]
    result = run_mdpo(["convert", "hf-to-megatron", "--hf", str(files["hf"]), "--out", str(tmp_path / "mc"), *check])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "check: 3 rows" in line]
    assert len(lines) == 1 and lines[0].endswith(": ok"), result.stdout
    tokens = int(lines[0].split("rows, ")[1].split(" tokens")[0])
    assert tokens > 3 * 10  # real prompt + chosen rows, not three ids
    result = run_mdpo(
        ["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "back"), *check]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.endswith(": ok") and "check: 3 rows" in line for line in result.stdout.splitlines())

    startup.prepare()  # what the command line does first (the CPU patches): check_conversion runs in this process
    model = describe_model({"init_from": str(tmp_path / "mc")})
    other = tmp_path / "other"
    tiny_hf_llama(seed=8, vocab_size=model.vocab_size).save_pretrained(other)  # same shapes, other weights
    with pytest.raises(MdpoError, match="conversion check failed"):
        check_conversion(other, tmp_path / "mc", model, None, 2)
    bad = run_mdpo(
        [
            "convert",
            "hf-to-megatron",
            "--hf",
            str(files["hf"]),
            "--out",
            str(tmp_path / "mc2"),
            "--check",
            "--check-rows",
            "0",
        ]
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["mdpo: error: --check-rows must be >= 1, got 0"]


def test_mxfp4_experts_read_as_transformers_dequantizes_them(tmp_path):
    """gpt-oss's released experts are MXFP4 (`*_blocks`, `*_scales`): a tiny gpt-oss's expert weights packed as the
    format says (random codes and scales) read back, names, shapes and every bit, as transformers' own dequantization
    of them, and the folder passes the family's checks; its export drops the config's quantization_config; a blocks
    tensor without its scales is one line naming it."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mdpo.checkpoint.hf import HFWeights
    from mdpo.checkpoint.hf_export import hf_export_config
    from mdpo.errors import MdpoError
    from mdpo.models.families.base import check_hf_state

    src, packed_dir = tmp_path / "hf", tmp_path / "mxfp4"
    tiny_hf_family("gpt_oss", vocab_size=VOCAB).save_pretrained(src)
    shutil.copytree(src, packed_dir)
    state = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    packed, want = dict(state), {}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, rows = state[name].shape  # [experts, in, out]: stored as out rows of in / 32 blocks
        blocks = torch.randint(0, 256, (experts, rows, inputs // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 132, (experts, rows, inputs // 32), dtype=torch.uint8, generator=g)
        del packed[name]
        packed |= {name + "_blocks": blocks, name + "_scales": scales}
        want[name] = convert_moe_packed_tensors(blocks, scales, dtype=state[name].dtype)
    save_file(packed, packed_dir / "model.safetensors")
    weights = HFWeights(packed_dir)
    assert sorted(weights) == sorted(state) and weights.dtype() == torch.float32
    for name, tensor in want.items():
        assert weights.shapes[name] == tuple(tensor.shape) == tuple(state[name].shape), name
        got = weights[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert got.abs().max() > 1.0 and (got == 0).any(), name  # scales above and below 1, and zero codes, in it
    model = describe_model({"init_from": str(packed_dir)})
    check_hf_state(families.get("gpt_oss"), weights, model)
    # the export is written in the model's dtype: the source's config.json less its quantization_config
    released = json.loads((packed_dir / "config.json").read_text())
    assert hf_export_config(model, {**released, "quantization_config": {"quant_method": "mxfp4"}}) == released
    del packed["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(packed, packed_dir / "model.safetensors")
    with pytest.raises(MdpoError) as err:
        HFWeights(packed_dir)
    assert str(err.value) == (
        f"{packed_dir}: MXFP4 tensor 'model.layers.1.mlp.experts.down_proj_blocks' has no "
        "'model.layers.1.mlp.experts.down_proj_scales' beside it"
    )


FP8_BLOCK = (16, 24)  # [rows, cols]: the tiny model's dimensions (24, 32, 64, 96, 128) end in partial blocks


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, cols] weight as DeepSeek V3's release stores it: float8_e4m3fn values, each block's float32 scale
    (`weight_scale_inv`) its largest |value| / 448, so that the block's values fill the format's range."""
    rows, cols = -(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1])
    values, scales = torch.empty(weight.shape, dtype=torch.float8_e4m3fn), torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            cut = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            scales[i, j] = weight[cut].abs().max() / 448
            values[cut] = (weight[cut] / scales[i, j]).to(torch.float8_e4m3fn)
    return values, scales


def fp8_oracle(values: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The format's description in float64: weight[r, c] = fp8[r, c] x scale[r // block rows, c // block cols]."""
    rows, cols = (torch.arange(size) // b for size, b in zip(values.shape, block))
    return values.double() * scales.double()[rows[:, None], cols[None, :]]


def test_conversion_writers_never_inherit_a_process_group(tmp_path):
    """Conversion writers are forked only from a process holding no process group (`parallel.holds_process_group`):
    after a world of one starts and stops here (as `--check` and `megatron_logits` do) megatron-core's parallel_state
    keeps none (`parallel.stop` releases the groups its destroy_model_parallel leaves, which forked writers inherited
    and hung on); from inside a running world (a Python caller's) the writers are spawned, not forked (forked, they
    found the caller's world of one and failed, or hung), and the conversion comes back bitwise."""
    from megatron.core import parallel_state

    from mdpo import parallel
    from mdpo.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from mdpo.config.layout import Layout

    parallel.start(Layout())
    assert parallel.holds_process_group()
    parallel.stop()
    left = [name for name, v in vars(parallel_state).items() if isinstance(v, torch.distributed.ProcessGroup)]
    assert not left and not parallel.holds_process_group(), left

    tiny_hf_llama(seed=6, vocab_size=VOCAB, num_hidden_layers=2).save_pretrained(tmp_path / "hf")
    parallel.start(Layout())
    try:
        hf_to_megatron(tmp_path / "hf", tmp_path / "mc", tp=2)
    finally:
        parallel.stop()
    original, returned = read_folder(tmp_path / "hf"), read_folder(megatron_to_hf(tmp_path / "mc", tmp_path / "back"))
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(tensor, returned[name]) for name, tensor in original.items())


def test_fp8_block_scaled_weights_read_as_the_format_says(tmp_path, capsys):
    """DeepSeek V3's released FP8 weights (`weight` in float8_e4m3fn, `weight_scale_inv` per block): a tiny
    DeepSeek-V3 quantized here in blocks of 16 x 24 (partial blocks at every edge) reads back, every bit, as the
    float64 description of the format rounded once to float32 (and as released, bf16 beside a float32 correction
    bias, as those float32 values rounded to bf16); converted at EP=2 (each writer reading its own
    tensors, as `model.init_from` does) its per-sequence log-probs equal transformers' float64 forward of those
    weights; the export drops the quantization_config with a note; a weight without its scale, or a scale of the
    wrong shape, is one line naming it."""
    from transformers import DeepseekV3ForCausalLM

    from mdpo.checkpoint.check import megatron_logits
    from mdpo.checkpoint.convert import Check, hf_to_megatron, megatron_to_hf
    from mdpo.checkpoint.hf import HFWeights
    from mdpo.errors import MdpoError

    src, packed_dir = tmp_path / "hf", tmp_path / "fp8"
    tiny_hf_family("deepseek_v3", vocab_size=VOCAB).save_pretrained(src)
    shutil.copytree(src, packed_dir)
    state = load_file(src / "model.safetensors")
    packed, want = dict(state), {}
    linear = [n for n, t in state.items() if t.dim() == 2 and not n.endswith(("embed_tokens.weight", "gate.weight"))]
    for name in [n for n in linear if n != "lm_head.weight"]:  # as released: all but the embeddings, head, routers
        packed[name], packed[name + "_scale_inv"] = fp8_quantize(state[name], FP8_BLOCK)
        want[name] = fp8_oracle(packed[name], packed[name + "_scale_inv"], FP8_BLOCK)
    save_file(packed, packed_dir / "model.safetensors")
    config = json.loads((packed_dir / "config.json").read_text())
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    config["quantization_config"] = quantization | {"weight_block_size": list(FP8_BLOCK)}
    (packed_dir / "config.json").write_text(json.dumps(config))

    weights = HFWeights(packed_dir)
    assert sorted(weights) == sorted(state) and weights.dtype() == torch.float32
    for name, tensor in want.items():
        got = weights[name]
        assert got.dtype == torch.float32 and torch.equal(got, tensor.float()), name
        assert 0 < (got.double() - state[name].double()).abs().max() < 0.1 * state[name].abs().max(), name

    mc, back = tmp_path / "mc", tmp_path / "back"
    assert hf_to_megatron(packed_dir, mc, ep=2, check=Check(rows=1)) == mc  # `--check` reads the FP8 folder too
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    model = describe_model({"init_from": str(mc)})
    ours = torch.stack(megatron_logits(mc, model, tokens.tolist()))
    expected = {}  # transformers' float64 forward of the weights the format describes, and of the unquantized ones
    for case, tensors in (("dequantized", want), ("unquantized", {})):
        shutil.copytree(src, tmp_path / case)
        save_file({name: t.double() for name, t in (state | tensors).items()}, tmp_path / case / "model.safetensors")
        kinds = dict(attn_implementation="eager", experts_implementation="eager", dtype=torch.float64)
        with torch.no_grad():
            expected[case] = DeepseekV3ForCausalLM.from_pretrained(tmp_path / case, **kinds).eval()(tokens).logits
    logps = lambda logits: torch.log_softmax(logits[:, :-1].double(), -1).gather(2, tokens[:, 1:, None]).sum((1, 2))
    got, oracle = logps(ours), logps(expected["dequantized"])
    assert torch.allclose(got, oracle, rtol=1e-5, atol=0), (got, oracle)
    assert not torch.allclose(got, logps(expected["unquantized"]), rtol=1e-5, atol=0)  # the quantization shows

    capsys.readouterr()
    megatron_to_hf(mc, back)
    assert "written in float32, not in the source's fp8 quantization" in capsys.readouterr().out
    del config["quantization_config"]
    assert json.loads((back / "config.json").read_text()) == config
    exported = load_file(back / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    mtp = "model.layers.4.eh_proj.weight"  # carried untrained: dequantized as read
    assert torch.equal(exported[mtp], want[mtp].float())

    # as released: bf16 beside the FP8 weights, the correction bias float32; dequantized into bf16 through float32
    released = {n: t if n in want or n.endswith(("_scale_inv", "_bias")) else t.bfloat16() for n, t in packed.items()}
    (tmp_path / "released").mkdir()
    save_file(released, tmp_path / "released" / "model.safetensors")
    shutil.copy(packed_dir / "config.json", tmp_path / "released" / "config.json")
    bf16 = HFWeights(tmp_path / "released")
    assert bf16.dtype() == torch.bfloat16 and bf16.dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == (
        torch.float32
    )
    assert all(torch.equal(bf16[name], tensor.float().bfloat16()) for name, tensor in want.items())
    # converted (one process, in parts) and back: bf16 as the dequantized weights read, the bias still float32
    megatron_to_hf(hf_to_megatron(tmp_path / "released", tmp_path / "released_mc"), tmp_path / "released_back")
    back16 = load_file(tmp_path / "released_back" / "model.safetensors")
    assert sorted(back16) == sorted(bf16)
    assert all(torch.equal(back16[name], bf16[name]) and back16[name].dtype == bf16.dtypes[name] for name in bf16)

    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # (24, 64): blocks of 16 x 24 need a 2 x 3 scale
    for edit, message in [
        (lambda: packed.pop(name + "_scale_inv"), f"FP8 tensor '{name}' has no '{name}_scale_inv' beside it"),
        (
            lambda: packed.update({name + "_scale_inv": torch.ones(2, 2)}),
            f"FP8 tensor '{name}' (24, 64): its scale '{name}_scale_inv' has shape (2, 2), blocks of [16, 24] "
            "need (2, 3)",
        ),
    ]:
        edit()
        save_file(packed, packed_dir / "model.safetensors")
        with pytest.raises(MdpoError) as err:
            HFWeights(packed_dir)
        assert str(err.value) == f"{packed_dir}: {message}"
