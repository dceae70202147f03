"""The planner against real runs: the small configurations benchmarks/validate_planner.py measures (and
tests/test_planner.py re-runs), what one of them costs by measurement and by prediction, and the efficiency fit.

Memory on CPU is peak RSS over a process floor: the same run with a negligible model (`floor_gib`), glibc told to
map every large block (`MEMORY_ENV`) so that freed tensors leave the RSS. Times come from runs without that
setting (`TIME_ENV`: fresh pages for every tensor cost a third more time), one thread per process.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from mdpo.config import ModelConfig
from mdpo.planner.estimate import Candidate, Cluster, Plan, Workload, plan
from mdpo.planner.models import MODELS
from mdpo.planner.runs import run_config

TIME_ENV = {"OMP_NUM_THREADS": "1"}
MEMORY_ENV = TIME_ENV | {"MALLOC_MMAP_THRESHOLD_": "65536"}
CPU_NORM_SAVES = 2  # torch's composite RMSNorm on CPU keeps its input and the normalised product
SMALL = ModelConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# SMALL with each MLP four experts of its width, two per token (dropless, routing balanced only on average)
SMALL_MOE = replace(SMALL, num_experts=4, moe_topk=2)
FLOOR = ModelConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)

# name: model, sequence length, micro-batch (pairs), processes, TP, PP, EP, recompute, reference
Config = tuple[ModelConfig, int, int, int, int, int, int, str, str]
CONFIGS: dict[str, Config] = {
    "base": (SMALL, 256, 2, 1, 1, 1, 1, "none", "online"),
    "mbs4": (SMALL, 256, 4, 1, 1, 1, 1, "none", "online"),
    "seq512": (SMALL, 512, 2, 1, 1, 1, 1, "none", "none"),
    "selective": (SMALL, 512, 2, 1, 1, 1, 1, "selective", "none"),
    "full": (SMALL, 512, 2, 1, 1, 1, 1, "full", "none"),
    "tp2": (SMALL, 256, 2, 2, 2, 1, 1, "none", "online"),
    "pp2": (SMALL, 256, 2, 2, 1, 2, 1, "none", "online"),
    "dp2": (SMALL, 256, 2, 2, 1, 1, 1, "none", "online"),
    "moe": (SMALL_MOE, 256, 2, 1, 1, 1, 1, "none", "online"),
    "moe_ep2": (SMALL_MOE, 256, 2, 2, 1, 1, 2, "none", "online"),
}
# --gpu (one GPU, bf16): a 1.1B Llama at 2048 tokens per sequence
ONE_B = MODELS["tinyllama-1.1b"]
GPU_CONFIGS: dict[str, Config] = {
    "1b_mbs1": (ONE_B, 2048, 1, 1, 1, 1, 1, "none", "online"),
    "1b_mbs2": (ONE_B, 2048, 2, 1, 1, 1, 1, "none", "none"),
    "1b_mbs4": (ONE_B, 2048, 4, 1, 1, 1, 1, "none", "none"),
    "1b_selective": (ONE_B, 2048, 4, 1, 1, 1, 1, "selective", "none"),
    "1b_full": (ONE_B, 2048, 4, 1, 1, 1, 1, "full", "none"),
}


def measure(
    model: ModelConfig,
    seq: int,
    mbs: int,
    nproc: int,
    tp: int,
    pp: int,
    ep: int,
    recompute: str,
    reference: str,
    steps: int,
    env: dict[str, str],
) -> dict[str, Any]:
    """One configuration trained for real: SDPA, two micro-batches per DP rank and step, no data cache (every run
    tokenizes, so every run has the same floor), each prompt in both sequences: on CPU a shared prompt's blocks are
    attended one SDPA call at a time, which keeps more per token (the rejected block's prompt keys gathered again,
    queries padded to a square call) than the GPU's one varlen call the planner models."""
    dp = nproc // (tp * pp)
    return run_config(
        model,
        seq_len=seq,
        micro_batch=mbs,
        steps=steps,
        warmup=2,
        nproc=nproc,
        tp=tp,
        pp=pp,
        ep=ep,
        reference=reference,
        attention="sdpa",
        global_batch=2 * mbs * dp,
        env=env,
        extra=(f"parallel.recompute={recompute}", "data.cache=false", "data.share_prompt=false"),
    )


def predict(
    model: ModelConfig,
    seq: int,
    mbs: int,
    nproc: int,
    tp: int,
    pp: int,
    ep: int,
    recompute: str,
    reference: str,
    cluster: Cluster,
) -> Plan:
    """The planner's prediction for one configuration: padded pairs as `measure` runs them, on `nproc` GPUs of one
    node, in fp32 on the CPU (norm_saves says which) and bf16 on a GPU."""
    cluster = replace(cluster, gpus_per_node=nproc)
    dp = nproc // (tp * pp)
    precision = "fp32" if cluster.norm_saves == CPU_NORM_SAVES else "bf16"  # the CPU runs fp32, the GPU bf16
    candidate = Candidate.on(
        cluster.world,
        tp=tp,
        pp=pp,
        ep=ep,
        recompute=recompute,
        micro_batch=mbs,
        packing=False,
        precision=precision,
        distributed_optimizer=False,
        overlap_grad_reduce=False,
        share_prompt=False,
    )
    workload = Workload(
        mean_tokens=2 * seq, max_tokens=2 * seq, reference=reference, global_batch=2 * mbs * dp, padded_fill=1.0
    )
    return plan(model, candidate, workload, cluster)


def floor_gib(seq: int, mbs: int, reference: str, cluster: Cluster) -> float:
    """Peak RSS of a process that does everything a configuration's does (same pairs) but with a negligible model."""
    config = (FLOOR, seq, mbs, 1, 1, 1, 1, "none", reference)
    return measure(*config, steps=3, env=MEMORY_ENV)["peak_memory_gib"] - predict(*config, cluster).memory_gib["total"]


def calibrate(configs: dict[str, Config], measured: dict[str, dict], cluster: Cluster) -> Cluster:
    """The one constant: the efficiency that best fits all step times (geometric mean of the ratios)."""
    ratios = []
    for name, got in measured.items():
        guess = predict(*configs[name], cluster)
        ratios.append(guess.time_s["compute"] / (got["step_s"] - (guess.step_s - guess.time_s["compute"])))
    return replace(cluster, efficiency=math.exp(sum(map(math.log, ratios)) / len(ratios)))


def compare(name: str, want: Plan, got: dict, memory: float) -> dict[str, Any]:
    """One CSV row: predicted against measured memory (GiB over the floor) and step time, with relative errors."""
    return {
        "config": name,
        "predicted_gib": round(want.memory_gib["total"], 3),
        "measured_gib": round(memory, 3),
        "memory_error": round(want.memory_gib["total"] / memory - 1, 3),
        "predicted_s": round(want.step_s, 3),
        "measured_s": round(got["step_s"], 3),
        "time_error": round(want.step_s / got["step_s"] - 1, 3),
    }
