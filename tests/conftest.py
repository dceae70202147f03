"""Shared fixtures: the ../shared data beside the checkout, and an in-process Megatron world of one."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from forkserver import ForkServer

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def megatron_world():
    """TP=PP=DP=1 in this process (gloo on CPU, NCCL on GPU), for tests that call model code directly."""
    from mdpo import megatron_cpu

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
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables: an in-process run (`parallel.start` as a world of one) sets
    them, and a child inheriting MASTER_PORT would try to listen on a port this process already holds."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


_FORK_SERVER: list[ForkServer] = []
_FORK_SERVER_LOCK = threading.Lock()


def run_mdpo(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`mdpo ...` (or, when args[0] is a .py file, that script) in a new process (N processes with torchrun's
    environment when nproc > 1), as a user would launch it, forked from this worker's `forkserver` (the imports done
    once); on a CUDA machine a fresh interpreter, under torchrun when nproc > 1."""
    env = subprocess_env()
    if not torch.cuda.is_available():
        with _FORK_SERVER_LOCK:  # tests may launch from two threads
            if not _FORK_SERVER:
                _FORK_SERVER.append(ForkServer(env))
                atexit.register(_FORK_SERVER[0].close)
        code, out, err = _FORK_SERVER[0].run(args, env, str(REPO), nproc, timeout)
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
    """Every weight random, norms too (around 1, so a swapped or missing norm shows), biases and q/k norms
    included; returns the model, float32, in eval mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.05)
    return model.float().eval()


# Tiny checkpoints of today's families, made with transformers' own classes: (config class, its arguments). The
# shapes exercise every mapping: GQA groups, a head size other than hidden / heads (Qwen 3, Mistral), tied heads,
# q/k/v biases, per-head q/k norms, and Llama 3's RoPE scaling with parameters other than Megatron's defaults
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
FAMILY_CASES = {
    "llama3.1": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=_LLAMA31_SCALING)),
    "llama3.2_tied": (
        "LlamaConfig",
        dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={**_LLAMA31_SCALING, "factor": 32.0}),
    ),
    "qwen2.5": ("Qwen2Config", dict(rope_theta=1000000.0)),
    "qwen2.5_tied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3_tied": ("Qwen3Config", dict(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(rope_theta=1000000.0, head_dim=32, sliding_window=None)),
}


def tiny_hf_family(case: str, seed: int = 0, vocab_size: int = 250, **overrides):
    """A random model of one of FAMILY_CASES, built by transformers' class for its architecture."""
    import transformers

    config_class, values = FAMILY_CASES[case]
    config = getattr(transformers, config_class)(vocab_size=vocab_size, **{**_COMMON, **values, **overrides})
    torch.manual_seed(seed)
    return randomize(transformers.AutoModelForCausalLM.from_config(config))


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
