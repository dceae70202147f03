"""Memory and step-time planner for DPO on Megatron-Core: what one GPU holds, part by part, and how long a step
takes, for a given layout or for every feasible one, ranked.

The terms follow what mdpo builds: bf16 weights with an fp32 gradient buffer, fp32 master weights and AdamW
moments (Megatron's mixed-precision optimizer, its states sharded over DP x CP with the distributed optimizer; a
mixture of experts' experts split over EP x ETP ranks, their states sharded over the expert data-parallel group);
a frozen bf16 reference copy when the reference runs online; activations of Megatron's layers with flash-style
attention (no [s, s] score matrix); one chunk of the vocab-parallel logits (`model.logprob_chunk_tokens` rows). Each
pair's prompt runs once where it is shared. Time counts model FLOPs on the tokens computed as bench_dpo.py does (6N
per trained token, 2N per reference token, N the weights a token uses: an MoE token's experts and router; causal
attention), divided by the cluster's peak times one calibrated efficiency, plus the exposed communication (the MoE
token dispatcher's all-to-alls among it), the pipeline bubble and the optimizer step (memory-bound: the bytes it
moves over the GPU's memory bandwidth).

A model is the run's `ModelConfig` (`models`: presets and counts); a candidate is the run's `Layout` plus the
settings the search varies (`estimate`: predictions, rules and search); `command` is `mdpo plan`. `runs` trains
synthetic pairs for real and `validation` checks the predictions against such runs (benchmarks/ and the tests);
neither is imported here.
"""

from mdpo.planner.command import add_arguments, run
from mdpo.planner.estimate import (
    GIB,
    GPU,
    GPUS,
    OPTIMIZER_BYTES_PER_PARAM,
    Candidate,
    Cluster,
    Plan,
    Workload,
    activation_bytes_per_token_layer,
    check_layout,
    computed_tokens,
    memory_per_gpu,
    microbatch_tokens,
    microbatches_per_step,
    moe_bytes_per_token,
    plan,
    rank_params,
    search,
    stage_params,
    step_time,
)
from mdpo.planner.models import (
    MODELS,
    active_params,
    expert_params,
    flops_per_token,
    kv_dim,
    layer_params,
    lora_params,
    matmul_params,
    model_shape,
    params,
)

__all__ = [
    "GIB",
    "GPU",
    "GPUS",
    "MODELS",
    "OPTIMIZER_BYTES_PER_PARAM",
    "Candidate",
    "Cluster",
    "Plan",
    "Workload",
    "activation_bytes_per_token_layer",
    "active_params",
    "add_arguments",
    "check_layout",
    "computed_tokens",
    "expert_params",
    "flops_per_token",
    "lora_params",
    "kv_dim",
    "layer_params",
    "matmul_params",
    "memory_per_gpu",
    "microbatch_tokens",
    "microbatches_per_step",
    "model_shape",
    "moe_bytes_per_token",
    "params",
    "plan",
    "rank_params",
    "run",
    "search",
    "stage_params",
    "step_time",
]
