"""Shared fixtures: the ../shared data beside the checkout, and an in-process Megatron world of one."""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from forkserver import ForkServer
from safetensors.torch import load_file
from torch import Tensor

from mdpo.config import DPOConfig, ModelConfig
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import ConfigError
from mdpo.loss import pair_losses

REPO = Path(__file__).resolve().parents[1]
VOCAB = 250  # the tiny models' vocabulary: padded to 256 at TP=1, six padding logits that must not enter the softmax
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip saying why (a user's clone has no ../shared; CI always does)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the ../shared folder beside the checkout")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    return shared_path("tokenizers", "llama2")


@pytest.fixture(scope="module")
def megatron_world():
    """TP=PP=DP=1 in this process (gloo on CPU, NCCL on GPU), for tests that call model code directly; one module's
    world (a pytest worker runs several modules, which must not inherit it: `parallel.holds_process_group`)."""
    from mdpo import megatron_cpu, parallel

    megatron_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with socket.socket() as sock:  # a free port, without touching os.environ (subprocesses inherit it)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    yield parallel_state
    parallel.stop()


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables: an in-process run (`parallel.start` as a world of one) sets
    them, and a child inheriting MASTER_PORT would try to listen on a port this process already holds."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


_FORK_SERVER: list[ForkServer] = []
_FORK_SERVER_LOCK = threading.Lock()


def fork_server() -> ForkServer:
    """This pytest worker's fork server, started on first use."""
    with _FORK_SERVER_LOCK:  # tests may launch from two threads
        if not _FORK_SERVER:
            _FORK_SERVER.append(ForkServer(subprocess_env()))
            atexit.register(_FORK_SERVER[0].close)
    return _FORK_SERVER[0]


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a shell script under test (the recipes): `subprocess_env`, and without CUDA its `mdpo` and
    `torchrun ... -m mdpo` commands forked by this worker's fork server (tests/shims, first on PATH)."""
    env = subprocess_env(**extra)
    if not torch.cuda.is_available():
        env.update(
            PATH=f"{REPO / 'tests' / 'shims'}{os.pathsep}{env['PATH']}", MDPO_TEST_FORKSERVER=fork_server().socket
        )
    return env


def run_mdpo(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`mdpo ...` (or, when args[0] is a .py file, that script) in a new process (N processes with torchrun's
    environment when nproc > 1), as a user would launch it, forked from this worker's `forkserver` (the imports done
    once); on a CUDA machine a fresh interpreter, under torchrun when nproc > 1."""
    env = subprocess_env()
    if not torch.cuda.is_available():
        code, out, err = fork_server().run(args, env, str(REPO), nproc, timeout)
        return subprocess.CompletedProcess(["mdpo", *args], code, out, err)
    target = args if args[0].endswith(".py") else ["-m", "mdpo", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *target]
    else:
        cmd = [sys.executable, *target]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_llama_config(vocab_size: int = 250, **overrides):
    """A few-layer GQA Llama whose shapes exercise every mapping (fused QKV groups, SwiGLU, vocab padding)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_hf_llama(seed: int = 0, **overrides):
    """Random HF LlamaForCausalLM; norms are randomised too so that a swapped norm would show."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return randomize(LlamaForCausalLM(tiny_llama_config(**overrides)))


def randomize(model):
    """Every weight random, norms too (around 1, so a swapped or missing norm shows), biases, q/k norms, MoE
    routers (a router's score correction bias too) and attention sinks included; returns the model, float32, in eval
    mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith((".gate.weight", ".router.weight")):  # a MoE router: tokens spread over every expert
                param.normal_(0.0, 0.2)
            elif name.endswith(".sinks"):  # attention sinks (gpt-oss): a share of each head's softmax, and small
                param.normal_(0.0, 0.3)  # enough that a few training steps move them visibly (test_parallel)
            else:
                param.normal_(0.0, 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router bias, on the sigmoid scores' scale
                buffer.normal_(0.0, 0.05)
    return model.float().eval()


# Tiny checkpoints of every registered family (tests/test_convert.py checks that each family has one, and converts
# them all both ways). The families transformers has are made by its own class, the family's oracle: FAMILY_CASES,
# case -> (family, its config's arguments); those whose model code is remote are written by hand: REMOTE_CHECKPOINTS
# below. The shapes exercise every mapping: GQA groups, a head size other than hidden / heads (Qwen 3, Mistral), tied
# heads, q/k/v biases, per-head q/k norms, and Llama 3's RoPE scaling with parameters other than Megatron's defaults
# (original context 64 with low/high frequency factors 0.5/2: at the tests' 10-40 positions the scaled and the
# unscaled rotations differ on most frequencies).
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
_LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 0.5,
    "high_freq_factor": 2.0,
    "original_max_position_embeddings": 64,
}
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, rope_theta=1000000.0)
FAMILY_CASES = {
    "llama3.1": ("llama", dict(rope_theta=500000.0, rope_scaling=_LLAMA31_SCALING)),
    "llama3.2_tied": (
        "llama",
        dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={**_LLAMA31_SCALING, "factor": 32.0}),
    ),
    # sliding windows shorter than the test sequences: Qwen's on its last two layers, Mistral's on every layer
    "qwen2.5": ("qwen2", dict(rope_theta=1000000.0, use_sliding_window=True, sliding_window=6, max_window_layers=2)),
    # scaled RoPE: linear (factor 2), and yarn as Qwen's long-context setting (factor 4 of an original context of 64:
    # its attention factor 0.1 ln 4 + 1 scales every score)
    "qwen2.5_tied": (
        "qwen2",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    ),
    "qwen3_tied": (
        "qwen3",
        dict(
            head_dim=32,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 1e6,
            },
        ),
    ),
    "mistral": ("mistral", dict(rope_theta=1000000.0, head_dim=32, sliding_window=8)),
    # norms after attention and the MLP, q / k normalised over the whole projection (GQA: 4 query, 2 key heads);
    # OLMo 3's window (shorter than the test sequences) on 3 of its 4 layers, a RoPE per layer type: yarn (factor 4
    # of 64, an attention factor of its own) on the full layer, unscaled of another base on the window layers
    "olmo2": ("olmo2", dict(rope_theta=500000.0)),
    "olmo3": (
        "olmo3",
        dict(
            sliding_window=6,
            rope_parameters={
                "full_attention": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "attention_factor": 1.2,
                    "rope_theta": 500000.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    # mixtures of experts: 4 experts, top 2 (renormalised, or not), a dense layer among expert layers (Qwen3-MoE's
    # mlp_only_layers / decoder_sparse_step), experts narrower than the dense MLP
    "qwen3_moe": ("qwen3_moe", dict(head_dim=32, mlp_only_layers=[1], norm_topk_prob=True, **_MOE)),
    "qwen3_moe_unnormed": ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=False, **_MOE)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    # Gemma 3: four norms a layer, 1 + w, GeGLU, scaled embeddings, query_pre_attn_scalar apart from the head size,
    # tied, a window of 6 on 3 of 4 layers with its own RoPE base, linear factor 2 on the global layer
    "gemma3_tied": (
        "gemma3",
        dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    # Gemma 3 as published from 4B on: the same text model inside Gemma3ForConditionalGeneration, beside a vision
    # tower and projector that mdpo carries untrained
    "gemma3_multimodal_tied": (
        "gemma3_multimodal",
        dict(
            text_config=dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=6, sliding_window_pattern=3),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
        ),
    ),
    # Qwen2-MoE: q/k/v biases, a gated shared expert wider than the routed ones beside them (its gate [1, hidden]
    # drawn as other weights are: randomize's router rule takes `.gate.weight`, not `shared_expert_gate.weight`),
    # layer 1 dense, windows by Qwen2MoeConfig's rule (every other layer below max_window_layers: 0 and 2)
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            shared_expert_intermediate_size=80,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=3,
            **_MOE,
        ),
    ),
    # gpt-oss: q/k/v and output biases, sinks, windows of 6 on layers 0 and 2, yarn (factor 4 of 64), a router with
    # a bias, experts with biases and the clamped GLU, its limit 0.5 so that the clamps act on these small weights
    "gpt_oss": (
        "gpt_oss",
        dict(
            head_dim=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            swiglu_limit=0.5,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "rope_theta": 150000.0,
            },
        ),
    ),
    # DeepSeek-V3: multi-latent attention (q through its low-rank projection, yarn with both mscales), layer 0
    # dense, then 8 sigmoid-routed experts with the score correction bias, top 4 within the best 2 of 4 groups
    # (Megatron's group score, its top 4 / 2 experts, is transformers' top 2), times 2.5, and a shared expert; one
    # multi-token prediction layer in the files (`multi_token_prediction_layer`), carried untrained
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.8,
                "mscale_all_dim": 0.6,
            },
        ),
    ),
    # DeepSeek-V2: queries without a low-rank projection (V2-Lite's), plain RoPE, a softmax router unrenormalised
    # (times 2), its top 2 within the best 2 of 4 groups scored by their best expert (Megatron's top 2 / 2), two
    # shared experts, layer 0 dense
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=2.0,
            moe_intermediate_size=32,
            n_shared_experts=2,
            first_k_dense_replace=1,
            rope_theta=10000.0,
        ),
    ),
    # GLM-4.5: q/k/v biases, per-head q/k norms, head_dim 32 apart from hidden / heads, RoPE on the first half of
    # each head's dims; layer 0 dense, then DeepSeek-V3's sigmoid router with its score correction bias, here its top
    # 2 of 8 experts within the best of 2 groups (Megatron's group score, its top 2 / 1 experts, is transformers'
    # top 2), times 2.5, beside a shared expert; one multi-token prediction layer in the files, carried untrained
    "glm4_moe": (
        "glm4_moe",
        dict(
            head_dim=32,
            attention_bias=True,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            rope_theta=10000.0,
        ),
    ),
}
MOE_CASES = (
    "qwen3_moe",
    "qwen3_moe_unnormed",
    "mixtral",
    "qwen2_moe",
    "gpt_oss",
    "deepseek_v3",
    "deepseek_v2",
    "glm4_moe",
)
# those whose transformers class computes a load-balancing loss (DeepseekV3ForCausalLM, V2 and Glm4MoeForCausalLM
# compute none)
POOLED_AUX_CASES = tuple(case for case in MOE_CASES if not case.startswith(("deepseek", "glm")))


def tiny_hf_family(case: str, seed: int = 0, vocab_size: int = 250, **overrides):
    """A random model of one of FAMILY_CASES, built by transformers' class of its family (the family's oracle)."""
    import transformers

    from mdpo.models import families

    family, values = FAMILY_CASES[case]
    config_class = getattr(transformers, families.get(family).oracle).config_class
    if "text_config" in values:  # a multimodal model: the text model's shape inside, its vision tower beside
        text = {"vocab_size": vocab_size, **_COMMON, **values["text_config"], **overrides}
        config = config_class(**{**values, "text_config": text})
    else:
        config = config_class(vocab_size=vocab_size, **{**_COMMON, **values, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    carries = families.get(family).carries_extra_layers
    for _ in range(getattr(config, "num_nextn_predict_layers", 0) if carries else 0):
        model.model.layers.append(multi_token_prediction_layer(model, len(model.model.layers)))
    return randomize(model)


def multi_token_prediction_layer(model, index: int) -> torch.nn.Module:
    """A multi-token prediction layer as DeepSeek-V3's and GLM-4.5's published files hold it (`model.layers.
    {num_hidden_layers + i}.*`: one of the model's decoder layers with its input norms and projection), which
    transformers' class does not build: saved with the model, never run (its forward takes the first
    num_hidden_layers), so mdpo must carry it untrained."""
    config, norm = model.config, type(model.model.norm)
    layer = type(model.model.layers[-1])(config, index)
    layer.enorm, layer.hnorm = norm(config.hidden_size), norm(config.hidden_size)
    layer.eh_proj = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
    return layer


ROW_LAYOUTS = ("padded", "packed", "shared", "shared_packed")


def collate_as(layout: str, pairs):
    """A micro-batch of the pairs in one of the four row layouts (data/batching.py)."""
    from mdpo.data.batching import collate, collate_packed, collate_shared

    return {
        "padded": lambda: collate(pairs, pad_id=0),
        "packed": lambda: collate_packed(pairs, pad_id=0, budget=512),
        "shared": lambda: collate_shared(pairs, pad_id=0),
        "shared_packed": lambda: collate_packed(pairs, pad_id=0, budget=512, shared=True),
    }[layout]()


def tiny_run_files(root: Path, *, n_train: int, n_eval: int, data_seed: int, model_seed: int) -> dict[str, Path]:
    """The demo tokenizer, generated train/eval pairs and a random HF Llama sized to that tokenizer, under root:
    everything a test run of `mdpo train` needs, with no download."""
    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    tokenizer = build_demo_tokenizer(root / "tokenizer")
    train, evaluation = make_demo_data(root / "data", n_train=n_train, n_eval=n_eval, seed=data_seed)
    tiny_hf_llama(seed=model_seed, vocab_size=len(tokenizer)).save_pretrained(root / "hf")
    return {"tokenizer": root / "tokenizer", "train": train, "eval": evaluation, "hf": root / "hf"}


def conversation_rows(pairs: list[dict]) -> list[dict]:
    """Plain pair rows ({prompt, chosen, rejected} strings) as `multi_turn` conversations, in order: two pairs as one
    conversation with a preference at both assistant turns (the second's prompt holds the first's chosen answer),
    then one pair alone, and so on: as many pairs, each row one prefix tree with a shared prompt."""
    turn = lambda pair: [
        {"role": "user", "content": pair["prompt"]},
        {"role": "assistant", "content": pair["chosen"], "rejected": pair["rejected"]},
    ]
    rows, k = [], 0
    while k < len(pairs):
        group = pairs[k : k + (2 if len(rows) % 2 == 0 else 1)]
        rows.append({"messages": [message for pair in group for message in turn(pair)]})
        k += len(group)
    return rows


def ranked_rows(pairs: list[dict]) -> list[dict]:
    """Plain pair rows as `ranked` rows of three scored completions: pair 2j's prompt with its chosen (score 3) and
    rejected (1) answers and pair 2j+1's chosen (2): all_pairs makes three pairs of each, every completion in two."""
    return [
        {"prompt": a["prompt"], "completions": [a["chosen"], a["rejected"], b["chosen"]], "scores": [3, 1, 2]}
        for a, b in zip(pairs[0::2], pairs[1::2])
    ]


# ------------------------------------------------------------------ shared by several test modules


def model_config(hf_config) -> ModelConfig:
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=10000.0,
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def mdpo_model(hf_model, attention: str = "auto", fused_swiglu: bool = False, fused_rope: bool = False):
    """mdpo's model of the HF model's weights, its output layer as training uses it (hidden states out)."""
    from mdpo.config import padded_vocab_size
    from mdpo.models import sharding
    from mdpo.models.families import llama
    from mdpo.models.families.base import check_hf_state, iter_hf_to_mcore
    from mdpo.models.gpt import build_gpt_model, transformer_config

    cfg = model_config(hf_model.config)
    cfg.attention, cfg.fused_swiglu, cfg.fused_rope = attention, fused_swiglu, fused_rope
    model = build_gpt_model(cfg, transformer_config(cfg), scoring=True)
    hf_state = hf_model.state_dict()
    check_hf_state(llama.FAMILY, hf_state, cfg)
    full = dict(iter_hf_to_mcore(llama.FAMILY, hf_state, cfg, padded_vocab_size(cfg.vocab_size, 1)))
    sharding.load_into(model, full)  # TP = PP = 1: the full state dict is the rank's
    return model.eval()


def random_pairs() -> list[TokenizedPair]:
    """Different prompt and response lengths, so rows are padded by different amounts."""
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()
    shapes = [(3, 4, 5), (7, 2, 3), (5, 6, 1), (1, 9, 2)]
    return [TokenizedPair(i, ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(shapes)]


def hf_logps_float64(hf_model, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(response token | prefix), each sequence run alone (no padding), in float64."""
    ids = prompt + response
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[t, ids[t + 1]].item() for t in range(len(prompt) - 1, len(ids) - 1))


def mdpo_logps(model, pairs, layout: str = "padded", cfg=None, thd: bool = False) -> torch.Tensor:
    """Through the trainer's forward and scoring: padded rows with causal attention alone; packed rows and shared
    prompts in attention blocks (or packed rows as THD sequences, `thd`); the output layer in chunks of 7 tokens."""
    from mdpo.training.step import Scorer

    scorer = Scorer(cfg if cfg is not None else model_config_of(model), chunk_tokens=7, thd=thd)
    batch = collate_as(layout, pairs)
    with torch.no_grad():
        stats = scorer.stats(batch, model, scorer.forward(batch, model))
    expected_tokens = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    assert stats.num_tokens.tolist() == expected_tokens
    return stats.logps


def model_config_of(model) -> ModelConfig:
    config = model.config
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
    )


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (0.5 + torch.rand(shape, generator=g))
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight", "norm.weight"))
        else 0.05 * torch.randn(shape, generator=g)
        for name, shape in shapes.items()
    }


def _save_hf(folder: Path, state: dict, config: dict, shard_size: str = "5GB") -> Path:
    """Sharded safetensors with an index (as HF writes them), config.json, and stand-ins for remote code/tokenizer."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True)
    save_torch_state_dict(state, folder, max_shard_size=shard_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (folder / "modeling_remote.py").write_text("# remote model code travels with the checkpoint\n")
    return folder


def qwen_checkpoint(folder: Path, seed: int = 3) -> Path:
    h, f, n, layers = 64, 96, 4, 2
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": VOCAB,
        "hidden_size": h,
        "intermediate_size": 2 * f,
        "num_hidden_layers": layers,
        "num_attention_heads": n,
        "kv_channels": h // n,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "seq_length": 256,
        "max_position_embeddings": 256,
        "no_bias": True,
        "tie_word_embeddings": False,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "torch_dtype": "float32",
    }
    shapes = {"transformer.wte.weight": (VOCAB, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (h,),
                p + "attn.c_attn.weight": (3 * h, h),
                p + "attn.c_attn.bias": (3 * h,),
                p + "attn.c_proj.weight": (h, h),
                p + "ln_2.weight": (h,),
                p + "mlp.w1.weight": (f, h),
                p + "mlp.w2.weight": (f, h),
                p + "mlp.c_proj.weight": (h, f),
            }
        )
    return _save_hf(folder, _random_state(shapes, seed), config, shard_size="100KB")


def baichuan_checkpoint(folder: Path, heads: int = 6, seed: int = 4) -> Path:
    """6 heads: ALiBi slopes for a head count that is not a power of two (as Baichuan 2 13B's 40)."""
    h, f, layers = 16 * heads, 80, 2
    config = {
        "architectures": ["BaichuanForCausalLM"],
        "model_type": "baichuan",
        "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "vocab_size": VOCAB,
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "model_max_length": 256,
        "tie_word_embeddings": False,
        "z_loss_weight": 0,
        "torch_dtype": "float32",
    }
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.W_pack.weight": (3 * h, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return _save_hf(folder, _random_state(shapes, seed), config)


# The registered families transformers has no class of: a tiny checkpoint of their published layout, by hand
REMOTE_CHECKPOINTS = {"qwen": qwen_checkpoint, "baichuan": baichuan_checkpoint}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


CLI_RUNNER = r"""
import contextlib, io, json, os, sys, traceback
from mdpo.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException as exc:  # anything escaping main() is a defect the test reports
            code = f"escaped: {traceback.format_exc()[-1500:]}"
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


# ------------------------------------------------------------------ the loss with every input checked (tests call it)
# mdpo.loss.pair_losses takes a DPOConfig that checked itself and tensors the step made; these check both, so the loss
# tests can state the formulas with plain keyword settings and lists.

# The DPOConfig fields preference_loss takes as keyword settings (the rest say where the reference comes from).
OBJECTIVE_SETTINGS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "rpo_alpha",
    "bco_delta",
    "discopop_tau",
    "f_divergence",
    "f_alpha_coef",
)

_NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"})  # both responses' lengths
_NEEDS_CHOSEN_LENGTHS = _NEEDS_LENGTHS | {"sft"}


def _check_shape(name: str, t: Tensor, like: Tensor) -> None:
    if tuple(t.shape) != tuple(like.shape):
        raise ConfigError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} like policy_chosen_logps")


def _as_lengths(name: str, value: Tensor | Sequence[float], like: Tensor) -> Tensor:
    """Response token counts as a float tensor shaped like the log-probs; they must be positive."""
    lengths = torch.as_tensor(value, device=like.device)
    _check_shape(name, lengths, like)
    lengths = lengths.to(torch.promote_types(like.dtype, torch.float32))
    bad = ~(lengths > 0)  # also catches NaN
    if bool(bad.any()):
        raise ConfigError(f"{name} must be positive token counts, got {lengths[bad][0].item():g}")
    return lengths


def _check_inputs(
    dpo: DPOConfig,
    like: Tensor,
    policy_rejected: Tensor,
    refs: dict[str, Tensor | None],
    chosen_lengths: object,
    rejected_lengths: object,
) -> None:
    """preference_loss's inputs: [B] shapes, references unless reference-free, the lengths the loss types read."""
    if like.dim() != 1:
        raise ConfigError(f"policy_chosen_logps must have shape [B], got {tuple(like.shape)}")
    _check_shape("policy_rejected_logps", policy_rejected, like)
    for name, ref in refs.items():
        if ref is None:
            if not dpo.reference_free:
                raise ConfigError(f"{name} is None but reference_free is False")
        else:
            _check_shape(name, ref, like)
    chosen_users = sorted(_NEEDS_CHOSEN_LENGTHS.intersection(dpo.loss_types))
    if chosen_lengths is None and (chosen_users or dpo.rpo_alpha > 0):
        user = f"loss_type {chosen_users[0]!r}" if chosen_users else f"rpo_alpha={dpo.rpo_alpha!r}"
        raise ConfigError(f"chosen_lengths is required by {user}")
    rejected_users = sorted(_NEEDS_LENGTHS.intersection(dpo.loss_types))
    if rejected_lengths is None and rejected_users:
        raise ConfigError(f"rejected_lengths is required by loss_type {rejected_users[0]!r}")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    chosen_lengths: Tensor | Sequence[float] | None = None,
    rejected_lengths: Tensor | Sequence[float] | None = None,
    reference_free: bool = False,
    **settings: object,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards, each shaped [B], with every input checked.

    Log-probs are summed over response tokens. `settings` are DPOConfig's objective fields, its defaults where not
    given: ``loss_type`` (one of ``LOSS_TYPES`` or a list of them, combined as the ``loss_weights``-weighted sum),
    ``beta``, ``label_smoothing`` (eps in [0, 0.5): sigmoid (cDPO), sigmoid_norm, robust, exo_pair (eps 0 means 1e-3,
    as in TRL), aot and aot_unpaired use it), ``rpo_alpha`` (adds ``rpo_alpha`` times loss type sft's term
    ``-policy_chosen_logps / chosen_lengths``, the chosen response's mean token NLL: RPO, NeMo's sft_loss_weight;
    ``rpo_alpha=a`` equals ``loss_type=["sigmoid", "sft"], loss_weights=[1, a]``), ``bco_delta`` (bco_pair's reward
    offset; TRL uses a running mean of past batch rewards, which a caller can keep and pass in), ``discopop_tau``
    (DiscoPOP's mixing temperature), ``f_divergence`` (reverse_kl, i.e. DPO; forward_kl, js_divergence or
    alpha_divergence: f-DPO's f'(policy / reference) takes the log-ratio's place in sigmoid, sigmoid_norm, hinge, ipo,
    exo_pair, robust and discopop, as TRL 1.16's ``f_divergence_type``) and ``f_alpha_coef`` (alpha_divergence's
    alpha, TRL's ``f_alpha_divergence_coef``).

    - ``reference_free``: reference log-probs are taken as zero (they may then be None).
    - ``chosen_lengths`` / ``rejected_lengths``: response token counts; required by ipo and sigmoid_norm (which
      compare per-token average log-probs), and chosen_lengths by sft and ``rpo_alpha > 0``.

    aot and aot_unpaired sort over the batch, so their pair i is not tied to input pair i and the result depends on
    which pairs share a call (e.g. the local micro-batch).
    """
    unknown = sorted(set(settings) - set(OBJECTIVE_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown preference_loss option {unknown[0]!r}; known: {', '.join(OBJECTIVE_SETTINGS)}")
    dpo = DPOConfig(**settings, reference="none" if reference_free else "online")  # checks every setting

    like = policy_chosen_logps
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    _check_inputs(dpo, like, policy_rejected_logps, refs, chosen_lengths, rejected_lengths)
    c_len = _as_lengths("chosen_lengths", chosen_lengths, like) if chosen_lengths is not None else None
    r_len = _as_lengths("rejected_lengths", rejected_lengths, like) if rejected_lengths is not None else None
    out = pair_losses(dpo, like, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, c_len, r_len)
    return out.losses, out.chosen_rewards, out.rejected_rewards


def nll_loss(chosen_logps_sum: Tensor, chosen_lengths: Tensor | Sequence[float]) -> Tensor:
    """Per-pair mean token NLL of the chosen response, ``-sum / length``, shaped [B]: loss type sft's term."""
    if chosen_logps_sum.dim() != 1:
        raise ConfigError(f"chosen_logps_sum must have shape [B], got {tuple(chosen_logps_sum.shape)}")
    logps = chosen_logps_sum.to(torch.promote_types(chosen_logps_sum.dtype, torch.float32))
    return -logps / _as_lengths("chosen_lengths", chosen_lengths, logps)
