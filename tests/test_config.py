import dataclasses
import json
import re
import textwrap

import pytest

from mdpo import config
from mdpo.checkpoint.description import describe_model
from mdpo.config import (
    ARG_ALIASES,
    DataConfig,
    ModelConfig,
    TrainConfig,
    config_to_dict,
    translate_args,
    validate,
)
from mdpo.errors import ConfigError, MdpoError
from mdpo.models import families


def load_config(path, overrides=()):
    """As `mdpo train` loads a config: the model described by the folder model.hf_config / init_from names."""
    return config.load_config(path, overrides, describe_model=describe_model)


def described(model: ModelConfig) -> ModelConfig:
    return describe_model(dataclasses.asdict(model))


REQUIRED = ["data.train_file=train.jsonl", "data.tokenizer=tok"]
# A small, consistent model so layout checks only fail when a test means them to.
SMALL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
]


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error(path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def valid_cfg(**sections):
    cfg = TrainConfig(data=DataConfig(train_file="train.jsonl", tokenizer="tok"))
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


# --------------------------------------------------------------------------- loading


def test_defaults_load_with_required_keys():
    cfg = load_config(None, REQUIRED)
    assert cfg == valid_cfg()
    assert cfg.optimizer.lr == 1e-6 and cfg.schedule.global_batch_size == 128
    assert cfg.model.num_key_value_heads is None and cfg.schedule.train_steps is None
    assert ConfigError.__mro__[1] is MdpoError


def test_yaml_file_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        data:
          train_file: a.jsonl
          tokenizer: tok
          eval_file: b.jsonl
        optimizer:
          lr: 1e-5          # YAML 1.1 would read this as a string
          weight_decay: 0   # int accepted for float
        parallel: {tp: 2, distributed_optimizer: yes}
        schedule:
          global_batch_size: 64
        logging:
        """,
    )
    cfg = load_config(
        path,
        [
            "optimizer.lr=3e-6",
            "schedule.train_steps=100",
            "data.eval_file=null",
            "logging.progress=false",
            "model.init_std=1",
            "logging.run_dir=2024",  # str fields keep the text
            "data.prompt_key=a: b",
        ],
    )
    assert cfg.optimizer.lr == 3e-6
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert isinstance(cfg.model.init_std, float)
    assert cfg.parallel.tp == 2 and cfg.parallel.distributed_optimizer is True
    assert cfg.schedule.global_batch_size == 64 and cfg.schedule.train_steps == 100
    assert cfg.data.train_file == "a.jsonl" and cfg.data.eval_file is None
    assert cfg.logging.progress is False and cfg.logging.run_dir == "2024"
    assert cfg.data.prompt_key == "a: b"
    assert cfg.logging.plot is True  # empty section keeps defaults
    assert load_config(path).optimizer.lr == 1e-5


def test_empty_file_is_defaults(tmp_path):
    path = write(tmp_path, "# nothing\n")
    assert load_config(path, REQUIRED) == valid_cfg()


def test_config_to_dict_roundtrip(tmp_path):
    cfg = load_config(None, [*REQUIRED, "optimizer.lr=2e-6"])
    d = config_to_dict(cfg)
    assert d["optimizer"]["lr"] == 2e-6 and d["data"]["train_file"] == "train.jsonl"
    import yaml

    path = write(tmp_path, yaml.safe_dump(d))
    assert load_config(path) == cfg


# --------------------------------------------------------------------------- load errors


def test_unknown_key_in_file_names_key_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "data: {train_file: a, tokenizer: t}\noptimizer:\n  lrr: 1.0e-5\n")
    msg = error(path)
    assert f"{path}: line 3" in msg
    assert "unknown config key 'optimizer.lrr'" in msg
    assert "known: lr, weight_decay" in msg
    assert "did you mean 'optimizer.lr'" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, "optimiser:\n  lr: 1\n")
    msg = error(path)
    assert "unknown config key 'optimiser'" in msg and "did you mean 'optimizer'" in msg
    assert f"{path}: line 1" in msg


def test_unknown_key_in_override():
    msg = error(None, [*REQUIRED, "optimizer.lrr=1e-5"])
    assert "override 'optimizer.lrr=1e-5'" in msg
    assert "unknown config key 'optimizer.lrr'" in msg and "did you mean 'optimizer.lr'" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "schedule.micro_batch_size=abc",
            "config key 'schedule.micro_batch_size' must be int, got str 'abc'",
        ),
        ("schedule.micro_batch_size=true", "must be int, got bool True"),
        ("schedule.micro_batch_size=2.0", "must be int, got float 2.0"),
        ("schedule.train_steps=x", "config key 'schedule.train_steps' must be int or null, got str 'x'"),
        ("optimizer.lr=fast", "config key 'optimizer.lr' must be float, got str 'fast'"),
        ("optimizer.lr=false", "must be float, got bool False"),
        ("data.train_file=null", "config key 'data.train_file' must be str, got null"),
        ("logging.plot=1", "config key 'logging.plot' must be bool, got int 1"),
    ],
)
def test_wrong_type_override(override, expected):
    msg = error(None, [*REQUIRED, override])
    assert expected in msg
    assert f"override '{override}'" in msg


def test_wrong_type_in_file_names_path_and_line(tmp_path):
    path = write(tmp_path, "schedule:\n  seed: 1\n  micro_batch_size: abc\n")
    msg = error(path, REQUIRED)
    assert f"{path}: line 3" in msg
    assert "config key 'schedule.micro_batch_size' must be int, got str 'abc'" in msg


def test_non_string_in_file_for_str_field(tmp_path):
    path = write(tmp_path, "data:\n  train_file: a\n  tokenizer: [a, b]\n")
    msg = error(path)
    assert f"{path}: line 3" in msg and "'data.tokenizer' must be str, got list ['a', 'b']" in msg


def test_quoted_number_is_not_a_float(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: '1e-5'\n")
    assert "must be float, got str '1e-5'" in error(path, REQUIRED)


@pytest.mark.parametrize("item", ["optimizer.lr", "=3", "lr 3"])
def test_malformed_override(item):
    msg = error(None, [item])
    assert f"malformed override '{item}'" in msg and "key=value" in msg


def test_override_on_section_or_below_leaf():
    assert "config key 'optimizer' is a section" in error(None, ["optimizer=3"])
    msg = error(None, ["optimizer.lr.x=3"])
    assert "'optimizer.lr' is float, not a section" in msg


def test_invalid_override_value_yaml():
    msg = error(None, ["optimizer.lr=[1,"])
    assert "override 'optimizer.lr=[1,'" in msg and "invalid YAML" in msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    msg = error(path)
    assert f"'{path}'" in msg and "cannot be read" in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 1\n  bad: [1, 2\n")
    msg = error(path)
    assert msg.startswith(f"{path}: line ") and "invalid YAML" in msg


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 1.0\n  lr: 2.0\n")
    msg = error(path)
    assert f"{path}: line 3: duplicate config key 'optimizer.lr'" in msg and "line 2" in msg


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("hello\n", "str")])
def test_top_level_not_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    msg = error(path)
    assert path in msg and "top level must be a mapping" in msg and kind in msg


def test_section_not_mapping(tmp_path):
    path = write(tmp_path, "optimizer: 5\n")
    msg = error(path)
    assert f"{path}: line 1" in msg and "config key 'optimizer' must be a mapping, got int 5" in msg
    msg = error(path, ["optimizer.lr=1.0"])
    assert "config key 'optimizer' must be a mapping" in msg


@pytest.mark.parametrize("key", ["data.train_file", "data.tokenizer"])
def test_missing_required(key):
    overrides = [o for o in REQUIRED if not o.startswith(key)]
    assert f"{key} is required" in error(None, overrides)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["schedule.warmup_ratio=1"], "schedule.warmup_ratio must be in [0, 1), got 1.0"),
        (["schedule.warmup_ratio=-0.1"], "schedule.warmup_ratio must be in [0, 1)"),
        (
            ["schedule.global_batch_size=10", "schedule.micro_batch_size=4"],
            "global_batch_size=10 is not divisible",
        ),
        (["schedule.micro_batch_size=0"], "schedule.micro_batch_size must be > 0, got 0"),
        (["schedule.global_batch_size=-8"], "schedule.global_batch_size must be > 0"),
        (["schedule.train_steps=0"], "schedule.train_steps must be > 0"),
        (["schedule.epochs=0"], "schedule.epochs must be > 0"),
        (["data.max_length=0"], "data.max_length must be > 0"),
        (["optimizer.lr=0"], "optimizer.lr must be > 0, got 0.0"),
        (["optimizer.lr=.nan"], "optimizer.lr must be finite, got nan"),
        (["optimizer.clip_grad=1e400"], "optimizer.clip_grad must be finite, got inf"),
        (["optimizer.adam_beta2=1"], "optimizer.adam_beta2 must be in [0, 1)"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be >= 0"),
        (["dpo.beta=0"], "dpo.beta must be > 0"),
        (["dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
        (
            ["dpo.f_divergence=kl"],
            "dpo.f_divergence must be reverse_kl, forward_kl, js_divergence or alpha_divergence, got 'kl'",
        ),
        (
            ["dpo.loss_type=[sigmoid, aot]", "dpo.f_divergence=forward_kl"],
            "dpo.f_divergence=forward_kl applies only to loss types sigmoid, sigmoid_norm, hinge, ipo, exo_pair, "
            "robust, discopop, sft",
        ),
        (["dpo.f_alpha_coef=.inf"], "dpo.f_alpha_coef must be finite, got inf"),
        (["dpo.ld_alpha=1.5"], "dpo.ld_alpha must be in [0, 1] (or null: off), got 1.5"),
        (
            ["dpo.loss_type=[sigmoid, aot_unpaired]", "dpo.use_weighting=true"],
            "dpo.use_weighting (WPO) does not apply to loss type 'aot_unpaired'",
        ),
        (["dpo.bco_delta=.nan"], "dpo.bco_delta must be finite, got nan"),
        (["dpo.loss_type=plackett_luce"], "dpo.loss_type plackett_luce takes whole rankings, not data.rank_pairs="),
        (
            ["dpo.loss_type=plackett_luce", "data.rank_pairs=ranking", "parallel.ep=2", "model.num_experts=4"],
            "dpo.loss_type plackett_luce needs parallel.ep=1",
        ),
        (["parallel.tp=0"], "parallel.tp must be >= 1, got 0"),
        (["parallel.pp=0"], "parallel.pp must be >= 1, got 0"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs parallel.tp > 1"),
        (["model.vocab_size=0"], "model.vocab_size must be > 0"),
        (["model.num_key_value_heads=0"], "model.num_key_value_heads must be > 0"),
        (
            ["model.num_key_value_heads=3"],
            "model.num_key_value_heads=3 does not divide model.num_attention_heads=4",
        ),
        (["model.hidden_size=66"], "model.num_attention_heads=4 does not divide model.hidden_size=66"),
        (["parallel.pp=3"], "parallel.pp=3 does not divide model.num_hidden_layers=4"),
        (["parallel.tp=3"], "parallel.tp=3 does not divide model.num_attention_heads=4"),
        (["parallel.tp=4"], "parallel.tp=4 does not divide model.num_key_value_heads=2"),
        (["logging.log_interval=0"], "logging.log_interval must be > 0"),
        (["model.norm_position=sandwich"], "model.norm_position must be pre, post or both, got 'sandwich'"),
        (["model.qk_norm_span=projection"], "model.qk_norm_span=projection needs model.qk_norm=true"),
        (
            ["model.window_rope_theta=10000"],
            "model.window_rope_theta is set but model.sliding_window is null (no layer has a window)",
        ),
        (
            ["model.norm_position=post", "model.attention=te"],
            "model.attention=te with model.norm_position=post, model.qk_norm_span=head and "
            "model.zero_centered_norms=false: Transformer Engine's layers fuse a plain norm into the linear after it",
        ),
        (
            ["model.attention_sinks=true", "model.attention=te"],
            "model.attention=te with model.attention_sinks, model.linear_bias or model.glu_clamp (gpt-oss): mdpo runs "
            "them on its local layers only",
        ),
        (["model.glu_clamp=7.0"], "model.glu_clamp and model.glu_linear_offset need model.hidden_act=quick_gelu"),
        (
            ["model.partial_rotary_factor=0.2"],
            "model.partial_rotary_factor=0.2 must be at most 1 and rotate an even number of each head's 16 dims, got 3",
        ),
        (
            ["model.partial_rotary_factor=0.5", "model.rope_scaling=yarn"],
            "model.partial_rotary_factor=0.5 with model.rope_scaling=yarn: yarn's attention factor scales the rotated "
            "dims only",
        ),
        (
            ["model.linear_bias=true", "model.num_experts=4", "parallel.tp=2", "parallel.sequence_parallel=true"],
            "the expert-tensor-parallel size 2 (parallel.etp, else parallel.tp) must be 1 for experts with biases "
            "(gpt-oss)",
        ),
    ],
)
def test_validation_rules(overrides, expected):
    assert expected in error(None, [*REQUIRED, *SMALL, *overrides])


def test_valid_layouts_pass():
    cfg = load_config(None, [*REQUIRED, *SMALL, "parallel.tp=2", "parallel.pp=4", "schedule.warmup_ratio=0"])
    assert cfg.parallel.tp == 2 and cfg.parallel.pp == 4
    # MHA: num_key_value_heads=None counts as num_attention_heads for the tp check
    load_config(None, [*REQUIRED, *SMALL, "model.num_key_value_heads=null", "parallel.tp=4"])
    # sequence parallelism on every attention (mdpo's local layers split the sequence too), with CP and shared prompts
    for attention in ("sdpa", "local"):
        load_config(
            None,
            [
                *REQUIRED,
                *SMALL,
                "parallel.tp=2",
                "parallel.sequence_parallel=true",
                f"model.attention={attention}",
                "data.share_prompt=true",
            ],
        )
    load_config(
        None,
        [
            *REQUIRED,
            *SMALL,
            "parallel.tp=2",
            "parallel.cp=2",
            "parallel.sequence_parallel=true",
            "model.attention=sdpa",
        ],
    )


def test_dpo_objective_keys_load():
    overrides = [
        "dpo.loss_type=[sigmoid, sft]",
        "dpo.loss_weights=[1, 0.5]",
        "dpo.f_divergence=alpha_divergence",
        "dpo.f_alpha_coef=0.3",
    ]
    dpo = load_config(None, [*REQUIRED, *overrides]).dpo
    assert dpo.loss_types == ("sigmoid", "sft") and dpo.weights == (1.0, 0.5)
    assert (dpo.f_divergence, dpo.f_alpha_coef, dpo.rpo_alpha) == ("alpha_divergence", 0.3, 0.0)
    assert (dpo.ld_alpha, dpo.use_weighting, dpo.bco_delta) == (None, False, None)  # off, off, running mean
    dpo = load_config(None, [*REQUIRED, "dpo.ld_alpha=0", "dpo.use_weighting=true", "dpo.bco_delta=0.25"]).dpo
    assert (dpo.ld_alpha, dpo.use_weighting, dpo.bco_delta) == (0.0, True, 0.25)


def test_validate_directly():
    validate(valid_cfg())
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide model.num_attention_heads=32"):
        validate(valid_cfg(parallel={"tp": 3}))


# --------------------------------------------------------------------------- aliases


def test_translate_args():
    argv = [
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size=4",
        "--use-distributed-optimizer",
        "--lr",
        "1e-5",
        "--train-iters",
        "10",
        "--seq-length=512",
        "--seed",
        "-1",
        "dpo.beta=0.2",
    ]
    assert translate_args(argv) == [
        "parallel.tp=2",
        "parallel.pp=4",
        "parallel.distributed_optimizer=true",
        "optimizer.lr=1e-5",
        "schedule.train_steps=10",
        "data.max_length=512",
        "schedule.seed=-1",
        "dpo.beta=0.2",
    ]
    assert translate_args(["--use-distributed-optimizer=false"]) == ["parallel.distributed_optimizer=false"]


def test_every_alias_loads():
    argv = []
    for flag, key in ARG_ALIASES.items():
        if key == "parallel.distributed_optimizer":
            argv.append(flag)
        else:
            argv += [flag, "0.5" if "adam_beta" in key else "1"]
    cfg = load_config(None, [*REQUIRED, *translate_args(argv)])
    assert cfg.parallel.distributed_optimizer is True
    assert cfg.optimizer.lr == 1.0 and cfg.optimizer.adam_beta2 == 0.5
    assert cfg.schedule.train_steps == 1 and cfg.data.max_length == 1 and cfg.schedule.seed == 1


def test_translate_args_errors():
    with pytest.raises(ConfigError, match="unknown flag '--micro-batch'; did you mean '--micro-batch-size'"):
        translate_args(["--micro-batch", "2"])
    with pytest.raises(ConfigError, match="flag '--lr' needs a value"):
        translate_args(["--lr"])
    with pytest.raises(ConfigError, match="flag '--lr' needs a value"):
        translate_args(["--lr", "--seed", "1"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        translate_args(["stray"])


# --------------------------------------------------------------------------- HF config.json


def write_hf(tmp_path, **overrides):
    """A config.json shaped like transformers' LlamaConfig.save_pretrained output."""
    hf = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
    }
    hf.update(overrides)
    hf = {k: v for k, v in hf.items() if v is not ...}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def check_hf_model(model, rope_theta=500000.0):
    assert (model.vocab_size, model.hidden_size, model.intermediate_size) == (100, 64, 128)
    assert (model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads) == (2, 4, 2)
    assert model.rms_norm_eps == 1e-6 and model.max_position_embeddings == 2048
    assert model.rope_theta == rope_theta
    assert model.init_std == 0.02


def test_hf_config_from_folder_and_file(tmp_path):
    folder = write_hf(tmp_path)
    cfg = load_config(None, [*REQUIRED, f"model.hf_config={folder}", "parallel.tp=2"])
    check_hf_model(cfg.model)
    model = described(ModelConfig(hf_config=str(folder / "config.json")))
    check_hf_model(model)
    model = described(model)  # idempotent
    check_hf_model(model)


def test_hf_config_from_init_from(tmp_path):
    folder = write_hf(tmp_path)
    cfg = load_config(None, [*REQUIRED, f"model.init_from={folder}"])
    check_hf_model(cfg.model)
    assert cfg.model.hf_config is None and cfg.model.init_from == str(folder)


def test_hf_config_rope_parameters_layout(tmp_path):
    # transformers >= 5 nests rope_theta under rope_parameters
    folder = write_hf(
        tmp_path,
        rope_theta=...,
        rope_scaling=...,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
    )
    model = described(ModelConfig(hf_config=str(folder)))
    check_hf_model(model, rope_theta=1e6)


def test_hf_config_real_llama_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        rope_theta=500000.0,
    ).save_pretrained(tmp_path)
    model = described(ModelConfig(hf_config=str(tmp_path)))
    check_hf_model(model)


def test_hf_config_missing_file(tmp_path):
    missing = tmp_path / "nowhere"
    msg = error(None, [*REQUIRED, f"model.hf_config={missing}"])
    assert f"model.hf_config='{missing}'" in msg and "cannot read" in msg
    msg = error(None, [*REQUIRED, f"model.init_from={tmp_path}"])
    assert "model.init_from=" in msg and str(tmp_path / "config.json") in msg


def test_hf_config_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "is not valid JSON" in error(None, [*REQUIRED, f"model.hf_config={tmp_path}"])


DEEPSEEK = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", n_routed_experts=8, n_group=1, topk_group=1
)
DEEPSEEK_V2 = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", n_routed_experts=8, num_experts_per_tok=6
)
GLM = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", n_routed_experts=8, num_experts_per_tok=4)
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "rope_type='llama3' without 'low_freq_factor' is not supported by mdpo's llama model",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}},
            "rope_type='longrope' is not supported by mdpo's llama model (rope types: default, llama3, linear, yarn)",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}},
            "rope_type='yarn' without 'original_max_position_embeddings' is not supported by mdpo's llama model",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "qwen2"}, "model_type='qwen2'"),
        (
            {"architectures": ["GemmaForCausalLM"], "model_type": "gemma"},
            "unsupported architecture GemmaForCausalLM; "
            "supported: LlamaForCausalLM (llama), QWenLMHeadModel (qwen), Qwen2ForCausalLM (qwen2)",
        ),
        ({"hidden_size": "64"}, "'hidden_size' must be int, got str '64'"),
        (
            {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "qkv_bias": False},
            "qkv_bias=false (q/k/v without biases) is not supported by mdpo's qwen2_moe model",
        ),
        (
            {
                "architectures": ["Olmo3ForCausalLM"],
                "model_type": "olmo3",
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                },
            },
            "rope_parameters.sliding_attention={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 10000.0} (a "
            "scaled RoPE on the window layers) is not supported by mdpo's olmo3 model",
        ),
        (
            {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attn_logit_softcapping": 50.0},
            "attn_logit_softcapping=50.0 (soft-capped attention scores) is not supported by mdpo's gemma3 model",
        ),
        (
            {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": False},
            "attention_bias=false (the attention without biases beside biased experts) is not supported by mdpo's "
            "gpt_oss model",
        ),
        (
            {
                "architectures": ["GptOssForCausalLM"],
                "model_type": "gpt_oss",
                "attention_bias": True,
                "swiglu_alpha": 1.5,
            },
            "swiglu_alpha=1.5 (Megatron's quick_gelu has 1.702) is not supported by mdpo's gpt_oss model",
        ),
        # DeepSeek-V3: what Megatron-Core's MLA and router compute otherwise
        (
            {**DEEPSEEK, "attention_bias": True},
            "attention_bias=true (Megatron-Core's MLA projections have no biases) is not supported by mdpo's "
            "deepseek_v3 model",
        ),
        (
            {**DEEPSEEK, "norm_topk_prob": False},
            "norm_topk_prob=false (Megatron-Core always renormalises sigmoid top-k scores) is not supported",
        ),
        ({**DEEPSEEK, "rope_interleave": False}, "rope_interleave=false (Megatron-Core's MLA de-interleaves"),
        ({**DEEPSEEK, "scoring_func": "softmax"}, "scoring_func='softmax' (DeepSeek-V3's router is sigmoid)"),
        (
            {**DEEPSEEK, "n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 8},
            "n_group=4 with topk_group=2 and num_experts_per_tok=8 is not supported by mdpo's deepseek_v3 model "
            "(Megatron-Core scores a group by its top num_experts_per_tok // topk_group experts",
        ),
        (
            {**DEEPSEEK, "rope_parameters": {**DEEPSEEK_YARN, "mscale": 0.8}},
            "rope_parameters mscale=0.8 with mscale_all_dim=None is not supported by mdpo's deepseek_v3 model",
        ),
        (
            {**DEEPSEEK, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type='linear' is not supported by mdpo's deepseek_v3 model (MLA's RoPE: default or yarn)",
        ),
        # DeepSeek-V2: transformers' class never renormalises; its groups are scored by their best expert
        (
            {**DEEPSEEK_V2, "norm_topk_prob": True},
            "norm_topk_prob=true (transformers' DeepseekV2ForCausalLM never renormalises the top-k scores) is not "
            "supported by mdpo's deepseek_v2 model",
        ),
        (
            {**DEEPSEEK_V2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
            "n_group=4 with topk_group=2 and num_experts_per_tok=6 is not supported by mdpo's deepseek_v2 model "
            "(Megatron-Core scores a group by its top num_experts_per_tok // topk_group experts, transformers by its "
            "top 1)",
        ),
        ({**DEEPSEEK_V2, "topk_method": "noaux_tc"}, "topk_method='noaux_tc' (top-k methods: greedy, group_limited"),
        # GLM-4.5: yarn on its half-rotary heads; DeepSeek-V3's router, which Megatron-Core always renormalises and
        # whose groups it scores otherwise
        (
            {**GLM, "rope_parameters": {**DEEPSEEK_YARN, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor=0.5 with rope_type='yarn' is not supported by mdpo's glm4_moe model (yarn's "
            "attention factor scales the rotated dims only, mdpo's the whole head)",
        ),
        ({**GLM, "hidden_act": "gelu"}, "hidden_act='gelu' is not supported by mdpo's glm4_moe model"),
        (
            {**GLM, "norm_topk_prob": False},
            "norm_topk_prob=false (Megatron-Core always renormalises sigmoid top-k scores) is not supported by mdpo's "
            "glm4_moe model",
        ),
        (
            {**GLM, "n_group": 4, "topk_group": 1},
            "n_group=4 with topk_group=1 and num_experts_per_tok=4 is not supported by mdpo's glm4_moe model "
            "(Megatron-Core scores a group by its top num_experts_per_tok // topk_group experts, transformers by its "
            "top 2)",
        ),
    ],
)
def test_hf_config_unsupported(tmp_path, changes, expected):
    folder = write_hf(tmp_path, **changes)
    msg = error(None, [*REQUIRED, f"model.hf_config={folder}"])
    assert expected in msg and str(folder / "config.json") in msg


def family_error(value: str) -> str:
    return f"model.family must be one of {', '.join(families.FAMILIES)}, got {value!r}"


def test_unknown_model_family_is_one_line(tmp_path):
    """model.family is checked where the registry is known (`describe_model`: the config, a leaf, cannot list the
    families): one line naming the key, the value and every registered family."""
    assert error(None, [*REQUIRED, f"model.hf_config={write_hf(tmp_path)}", "model.family=foo"]) == family_error("foo")
    with pytest.raises(ConfigError) as info:
        described(ModelConfig(family="gpt2"))
    assert str(info.value) == family_error("gpt2")


def test_unknown_model_family_of_a_randomly_initialised_model_is_one_line():
    assert error(None, [*REQUIRED, "model.family=foo"]) == family_error("foo")


def test_hf_config_conflict_with_explicit_value(tmp_path):
    folder = write_hf(tmp_path)
    msg = error(None, [*REQUIRED, f"model.hf_config={folder}", "model.hidden_size=128"])
    assert "model.hidden_size=128 conflicts with hidden_size=64" in msg
    cfg = load_config(None, [*REQUIRED, f"model.hf_config={folder}", "model.hidden_size=64"])
    assert cfg.model.hidden_size == 64


def test_a_mixture_of_experts_resolves_its_parallel_defaults():
    """Unset, sequence parallelism is on for a mixture of experts under TP (Megatron-Core's MoE layers need it) and
    off otherwise; `dpo.router_aux_loss_type: auto` is transformers' pooled loss where it is exact (one pipeline
    stage, no full recompute) and Megatron's per-layer loss elsewhere; an explicit type stays."""
    moe = dict(num_experts=4, moe_topk=2, router_aux_loss_coef=0.01, num_hidden_layers=4)
    cfg = lambda parallel=None, dpo=None, **model: config.TrainConfig(
        model=config.ModelConfig(**{**moe, **model}),
        parallel=config.ParallelConfig(**(parallel or {})),
        dpo=config.DPOConfig(**(dpo or {})),
    )
    assert cfg({"tp": 2}).parallel.layout(moe=True).sequence_parallel
    assert not cfg({"tp": 2}, num_experts=None).parallel.layout(moe=False).sequence_parallel
    assert not cfg().parallel.layout(moe=True).sequence_parallel  # TP = 1
    assert cfg().router_aux_loss_type == "transformers"
    assert cfg({"pp": 2}).router_aux_loss_type == "megatron"
    assert cfg({"recompute": "full"}).router_aux_loss_type == "megatron"
    assert cfg({"pp": 2}, {"router_aux_loss_type": "seq"}).router_aux_loss_type == "seq"


def test_multi_latent_attention_refuses_what_megatron_computes_otherwise():
    """A DeepSeek-V3-shaped model's fields that Megatron-Core's MLA and router cannot follow: one line each, naming
    the field."""
    mla = dict(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    experts = dict(num_experts=8, moe_topk=4, router_score="sigmoid", router_expert_bias=True)
    cases = {
        "model.router_group_topk=1 with model.moe_topk=4": dict(router_groups=4, router_group_topk=1),
        "model.router_groups=3 must divide model.num_experts=8": dict(router_groups=3, router_group_topk=1),
        "model.router_score=sigmoid with model.norm_topk_prob=false": dict(norm_topk_prob=False),
        "model.router_expert_bias=true needs model.router_score=sigmoid": dict(router_score="softmax"),
        "model.kv_lora_rank (multi-latent attention) needs RoPE, unscaled or yarn": dict(rope_scaling="linear"),
        "model.rope_mscale=0.8 with model.rope_mscale_all_dim=None": dict(rope_scaling="yarn", rope_mscale=0.8),
        "model.fused_rope=true with model.kv_lora_rank": dict(fused_rope=True),
        "model.attention=te with model.kv_lora_rank": dict(attention="te"),
        "model.router_bias_update_rate must be >= 0, got -0.001": dict(router_bias_update_rate=-0.001),
        "model.router_bias_update_rate=0.001 needs a router with a correction bias (model.router_expert_bias: "
        "DeepSeek-V3's e_score_correction_bias); this model's router has none": dict(
            router_bias_update_rate=0.001, router_expert_bias=False
        ),
    }
    for message, changes in cases.items():
        with pytest.raises(ConfigError) as info:
            config.ModelConfig(**{**mla, **experts, **changes}).check()
        assert message in str(info.value), (message, str(info.value))
    dense = "model.router_bias_update_rate=0.001 needs a router with a correction bias"
    with pytest.raises(ConfigError, match=re.escape(dense)):
        config.ModelConfig(router_bias_update_rate=0.001)
    updated = config.ModelConfig(**mla, **experts, router_bias_update_rate=0.001)
    for section, message in [
        (dict(lora=config.LoRAConfig(rank=4)), "lora.rank > 0 takes model.router_bias_update_rate=0"),
        (
            dict(parallel=config.ParallelConfig(recompute="full")),
            "model.router_bias_update_rate > 0 with parallel.recompute=full",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.TrainConfig(model=dataclasses.replace(updated, init_from="base"), **section)


def test_a_key_newer_than_a_checkpoint_is_no_change_at_its_default():
    """A checkpoint written before a config key existed resumes as the run it was where the key holds its default
    (it does what the checkpoint's run did), and lists the key as a change otherwise."""
    from mdpo.config.resume import config_changes

    current = config_to_dict(config.TrainConfig())
    saved = json.loads(json.dumps(current))
    del saved["dpo"]["router_aux_loss_type"]
    assert config_changes(saved, current) == ([], [])
    current["dpo"]["router_aux_loss_type"] = "seq"
    assert config_changes(saved, current) == ([], ["dpo.router_aux_loss_type None -> 'seq'"])


def test_sliding_windows_are_read_as_transformers_reads_them(tmp_path):
    """Mistral's sliding_window on every layer; Qwen's only with use_sliding_window, on the layers from
    max_window_layers on (or those layer_types marks); and a model folder written back says the same."""
    from transformers import Qwen2Config

    from mdpo.models import families

    qwen = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=4, sliding_window=8)
    mistral = dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)
    cases = {
        "mistral": (mistral, 8, None),
        "qwen_off": ({**qwen, "use_sliding_window": False}, None, None),
        "qwen_max_window_layers": ({**qwen, "use_sliding_window": True, "max_window_layers": 2}, 8, [2, 3]),
        "qwen_every_layer": ({**qwen, "use_sliding_window": True, "max_window_layers": 0}, 8, None),
        "qwen_layer_types": (
            {**qwen, "use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"] * 2},
            8,
            [0, 2],
        ),
    }
    folder = lambda name: (tmp_path / name).mkdir() or tmp_path / name
    for name, (changes, window, layers) in cases.items():
        model = describe_model({"hf_config": write_hf(folder(name), **changes)})
        assert (model.sliding_window, model.sliding_window_layers) == (window, layers), name
    model = describe_model({"hf_config": write_hf(folder("again"), **cases["qwen_max_window_layers"][0])})
    written = Qwen2Config(**families.get("qwen2").write_config(model))
    assert written.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert written.sliding_window == 8 and written.use_sliding_window
