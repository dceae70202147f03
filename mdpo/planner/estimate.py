"""The planner's predictions: per-GPU memory by part and step time of one candidate (a `Layout` and the settings
the planner varies with it) on a cluster, the rules a candidate must pass, and the search over candidates."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from mdpo.config import PLANNER_WORDING, RECOMPUTE, Layout, ModelConfig
from mdpo.errors import ConfigError
from mdpo.planner.models import flops_per_token, kv_dim, layer_params, lora_params, params, q_dim

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator as the predictions see it: its memory, dense peak and two bandwidths."""

    memory_gib: float
    peak_tflops: float  # dense bf16
    intra_node_gbs: float  # GB/s per GPU, one direction (NVLink)
    memory_gbs: float  # HBM bandwidth, GB/s


GPUS = {
    "a800-80g": GPU(80, 312, 200, 2039),  # NVLink capped at 400 GB/s both directions
    "a100-80g": GPU(80, 312, 300, 2039),
    "h800-80g": GPU(80, 989, 200, 3350),
    "h100-80g": GPU(80, 989, 450, 3350),
    "h200-141g": GPU(141, 989, 450, 4800),
}
# What the optimizer step moves per parameter of its shard: torch's foreach AdamW (Megatron's fallback without
# Transformer Engine or apex) reads and writes the fp32 master weight, both moments and a square-root temporary
# in seven passes (72 bytes); Megatron adds the gradient norm (4), the bf16 weight copy (6) and zeroing the
# gradient buffer (4). The norm is read once a step (`training.optimizer.optimizer_step`; until issue 29 mdpo's
# finiteness check read it a second time, ~90 bytes in all).
OPTIMIZER_BYTES_PER_PARAM = 86


@dataclass(frozen=True)
class Cluster:
    """The GPUs a run gets, their links, and the constants fitted to measurements (efficiency, norm_saves)."""

    gpu: GPU
    nodes: int = 1
    gpus_per_node: int = 8
    inter_node_gbs: float = 25.0  # GB/s per GPU between nodes (e.g. one 200 Gb/s NIC per GPU)
    # of peak on the model FLOPs, before communication, bubbles and the optimizer step: fitted on a 1.1B Llama on one
    # GPU (validate_planner.py --gpu: 0.349 on an H100, 0.359 on an H200); larger matrices usually do better
    efficiency: float = 0.35
    usable_memory: float = 0.92  # of each GPU's memory: the CUDA context and allocator fragmentation take the rest
    # hidden-sized tensors torch's RMSNorm keeps: one kernel on CUDA keeps its input; on CPU it is composite and
    # keeps the input and the normalised product (the per-token rsqrt is negligible either way)
    norm_saves: int = 1
    collective_latency_us: float = 10.0  # fixed cost of one TP/CP collective (NCCL within a node: a few us)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def flops_per_s(self) -> float:
        """What the whole cluster achieves on the model's FLOPs."""
        return self.world * self.gpu.peak_tflops * 1e12 * self.efficiency


@dataclass(frozen=True)
class Workload:
    """The data and the schedule, as the predictions need them: how many pairs, how long, how batched."""

    pairs: int = 61_000
    mean_tokens: float = 1010  # per pair: prompt + chosen + prompt + rejected (as TRL counts tokens)
    max_tokens: int = 8192  # per pair after truncation (each sequence at most half, padded)
    epochs: float = 3
    reference: str = "precomputed"  # online | precomputed | none
    global_batch: int = 128  # pairs per optimizer step
    padded_fill: float = 0.6  # real tokens / token slots of padded micro-batches (data stats tell; packs: 0.95)
    pack_fill: float = 0.95
    # per pair, counted once: what a shared prompt saves (UltraFeedback in Tulu 2, Llama 2 tokenizer: 199 of 997)
    prompt_tokens: float = 200
    # LoRA's rank (lora.rank; 0: full tuning): gradients and Adam states for the adapters only, the base frozen (no
    # weight gradients in backward), and an online reference that is the base itself (no second copy)
    lora_rank: int = 0


_ONE_GPU = Layout(wording=PLANNER_WORDING)


@dataclass(frozen=True)
class Candidate:
    """What the planner predicts for: the parallel sizes (`layout`, DP included, its errors in the planner's words)
    and the run settings the search varies with them."""

    layout: Layout = _ONE_GPU
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective | full
    micro_batch: int = 1  # pairs per micro-batch (padded)
    packing: bool = True
    pack_tokens: int | None = None  # None: the longest pair (mdpo's default, 2 x data.max_length)
    overlap_grad_reduce: bool = True
    precision: str = "bf16"  # bf16 | fp32
    # each pair one sequence [prompt | chosen | rejected] (data.share_prompt): not with CP; on mdpo's attention,
    # with or without sequence parallelism (Transformer Engine's attention takes no blocks)
    share_prompt: bool = True
    logprob_chunk_tokens: int = 1024  # rows of logits that exist at once (model.logprob_chunk_tokens)
    fused_swiglu: bool = False  # model.fused_swiglu: the MLP keeps 3 instead of 5 intermediate-sized activations

    @classmethod
    def on(
        cls,
        world: int,
        *,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        vpp: int = 1,
        sequence_parallel: bool = False,
        **settings: Any,
    ) -> Candidate:
        """The candidate on `world` GPUs: DP is what TP x PP x CP leave (a ConfigError when they do not divide it,
        or when the sizes break their own rules)."""
        layout = Layout.for_world(
            world, tp=tp, pp=pp, cp=cp, vpp=vpp, sequence_parallel=sequence_parallel, wording=PLANNER_WORDING
        )
        return cls(layout, **settings)

    @property
    def width(self) -> int:
        """Bytes per weight or activation value."""
        return 2 if self.precision == "bf16" else 4

    def as_dict(self) -> dict[str, Any]:
        """The sizes (tp, pp, cp, dp, vpp, sequence_parallel) and the settings, flat: `mdpo plan --json`'s layout."""
        sizes = {f.name: getattr(self.layout, f.name) for f in dataclasses.fields(self.layout) if f.name != "wording"}
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"}
        return sizes | settings


@dataclass
class Plan:
    """One candidate's prediction. `layout` and `dp` are its candidate's sizes, for the table and the checks."""

    candidate: Candidate
    memory_gib: dict[str, float]  # per GPU, the fullest pipeline stage
    step_s: float
    time_s: dict[str, float]  # parts of a step
    tokens_per_s_per_gpu: float
    workload_h: float
    fits: bool

    @property
    def layout(self) -> Layout:
        """The parallel sizes (the JSON's "layout" holds these and the candidate's settings, flat)."""
        return self.candidate.layout

    @property
    def dp(self) -> int:
        return self.candidate.layout.dp

    def as_dict(self) -> dict[str, Any]:
        """`mdpo plan --json`'s entry: the candidate under "layout", then DP and the predictions."""
        predictions = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "candidate"}
        return {"layout": self.candidate.as_dict(), "dp": self.dp, **predictions}


def computed_tokens(workload: Workload, candidate: Candidate) -> float:
    """Tokens the model runs per pair on average: both sequences, or the prompt once when it is shared."""
    return workload.mean_tokens - (workload.prompt_tokens if candidate.share_prompt else 0.0)


def microbatch_tokens(workload: Workload, candidate: Candidate) -> int:
    """Token slots of the largest micro-batch: a pack, or micro_batch pairs padded to the longest pair (two rows
    of half the pair's tokens, or one shared row: the pair less one prompt, taken at the mean prompt length)."""
    if candidate.packing:
        return candidate.pack_tokens or workload.max_tokens
    shared = workload.prompt_tokens if candidate.share_prompt else 0
    return int(candidate.micro_batch * (workload.max_tokens - shared))


def microbatches_per_step(workload: Workload, candidate: Candidate) -> float:
    """Micro-batches each DP rank runs per optimizer step (packs hold about slots x fill / mean pairs)."""
    dp = candidate.layout.dp
    if candidate.packing:
        per_pair = computed_tokens(workload, candidate)
        pairs_per_pack = max(1.0, microbatch_tokens(workload, candidate) * workload.pack_fill / per_pair)
        return max(1.0, workload.global_batch / dp / pairs_per_pack)
    return max(1.0, workload.global_batch / (dp * candidate.micro_batch))


def activation_bytes_per_token_layer(
    model: ModelConfig, candidate: Candidate, norm_saves: int = 1, key_ratio: float = 1.0
) -> float:
    """Bytes autograd keeps per token and layer (for one micro-batch in flight), from what each op saves in
    Megatron's layers with flash-style attention: the two norms' saved tensors and their matmuls' inputs
    ((2 x norm_saves + 2)h; split over TP with sequence parallelism), q and the key/value heads repeated to the
    query heads, the attention output and the projection's input (5q/TP, q = heads x head size, the hidden size
    for most models; selective recompute keeps instead q and
    k after the rotary embedding, the fused QKV output the value is a view of, and the projection input), and in
    the MLP the fused gate/up output, the silu, the up half plus Megatron's glu_linear_offset (a copy), their
    product as the down projection's input (5f/TP; 3f/TP with the fused SwiGLU, which keeps only the gate/up output
    and the product). Full recompute keeps only each layer's input (one layer
    recomputed at a time is the caller's). With a shared prompt the blocks' keys and values are gathered per response,
    `key_ratio` (keys per query token: both sequences' tokens over the tokens computed) times the queries'. Left out:
    the rotary cos/sin per layer (4 x head_dim per row position, under 1%)."""
    h, f, t, q = model.hidden_size, model.intermediate_size, candidate.layout.tp, q_dim(model)
    sequence_parallel = candidate.layout.sequence_parallel
    width = candidate.width
    if candidate.recompute == "full":
        return width * h / (t if sequence_parallel else 1)
    norms = (2 * norm_saves + 2) * h / (t if sequence_parallel else 1)
    attention = 3 * (q + kv_dim(model)) / t if candidate.recompute == "selective" else 5 * q / t
    if key_ratio > 1 and candidate.recompute != "selective":  # a shared prompt's keys are gathered per response
        attention += 2 * (key_ratio - 1) * q / t
    return width * (norms + attention + (3 if candidate.fused_swiglu else 5) * f / t)


def _in_flight(candidate: Candidate, workload: Workload, first: bool) -> float:
    """Micro-batches' activations the first stage holds at the end of warmup, in whole stages: PP under 1F1B; with
    the interleaved schedule (VPP chunks, groups of PP micro-batches) Megatron's warmup of 2 (PP - 1) + (VPP - 1) PP
    + 1 chunk-forwards, each 1/VPP of the stage's layers."""
    p, v = candidate.layout.pp, candidate.layout.vpp
    if not first or p == 1:
        return 1.0
    microbatches = math.ceil(microbatches_per_step(workload, candidate))
    if v == 1:
        return float(min(p, microbatches))
    return min(2 * (p - 1) + (v - 1) * p + 1, v * microbatches) / v


def memory_per_gpu(model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster) -> dict[str, float]:
    """Peak GiB on one GPU of the fullest pipeline stage, by part. The first stage holds the input embedding and,
    under 1F1B, up to PP micro-batches of activations; the last holds the head, one micro-batch in flight and one
    chunk of logits; with PP = 1 one stage holds all of it."""
    layout = candidate.layout
    t, p, c = layout.tp, layout.pp, layout.cp
    width = candidate.width
    shard = layout.dp * c if candidate.distributed_optimizer else 1
    optimizer_per_param = 12 if candidate.precision == "bf16" else 8  # bf16: fp32 master + two moments
    tokens = microbatch_tokens(workload, candidate) / c
    key_ratio = workload.mean_tokens / computed_tokens(workload, candidate)
    layer_bytes = activation_bytes_per_token_layer(model, candidate, cluster.norm_saves, key_ratio)
    stage_layers = math.ceil(model.num_hidden_layers / p)
    vocab_part = model.vocab_size * model.hidden_size / t  # embedding or head rows of one TP rank
    stages = []
    for first, last in ((True, False), (False, True)) if p > 1 else ((True, True),):
        # a tied head is the embedding on one stage, a copy of it (own grads and optimizer state) on the last
        vocab_copies = 1 if first and last and model.tie_word_embeddings else first + last
        weights = stage_layers * layer_params(model) / t + vocab_part * vocab_copies
        activations = layer_bytes * stage_layers * tokens * _in_flight(candidate, workload, first)
        if last:  # the final norm's saved tensors
            activations += width * cluster.norm_saves * model.hidden_size * tokens
        # one chunk of logits (training.vocab_head), at its fullest in backward: the recomputed matmul and its
        # fp32 softmax gradient (in bf16 also the matmul's bf16 output and the gradient cast back, 8 bytes a value;
        # fp32 works in place, 4); and, while it is alive, the output layer's weight gradient in the weights'
        # dtype, before DDP adds it into the fp32 buffer
        rows = min(tokens, candidate.logprob_chunk_tokens)
        logits = rows * model.vocab_size / t * (8 if width == 2 else 4) + width * vocab_part if last else 0.0
        if candidate.recompute == "full":  # backward rebuilds one layer at a time, once the logits are gone
            kept = activation_bytes_per_token_layer(model, replace(candidate, recompute="none"), cluster.norm_saves)
            activations += max(0.0, kept * tokens - logits)
        # what the optimizer holds: every weight, or (LoRA) the adapters alone, besides the frozen base
        adapters = stage_layers * lora_params(model, workload.lora_rank, t)
        trained = adapters if workload.lora_rank else weights
        online_copy = workload.reference == "online" and not workload.lora_rank
        parts = {
            "weights": width * (weights + adapters),
            "grads": 4 * trained,  # Megatron's fp32 main-grad buffer (grad_reduce_in_fp32)
            "optimizer": optimizer_per_param * trained / shard,
            "reference": width * weights if online_copy else 0.0,
            "activations": activations,
            "logits": logits,
        }
        stages.append({k: v / GIB for k, v in parts.items()} | {"total": sum(parts.values()) / GIB})
    return max(stages, key=lambda stage: stage["total"])


def step_flops(model: ModelConfig, candidate: Candidate, workload: Workload) -> float:
    """Model FLOPs of one step's real tokens: the policy's forward and backward (LoRA: no weight gradients of the
    base), an online reference's forward, and what activation recompute runs again."""
    h, layers = model.hidden_size, model.num_hidden_layers
    seq = workload.mean_tokens / 2  # each response attends to its prompt and itself, shared or not
    tokens = workload.global_batch * computed_tokens(workload, candidate)
    flops = tokens * flops_per_token(model, seq, trained=True, frozen=workload.lora_rank > 0)
    if workload.reference == "online":
        flops += tokens * flops_per_token(model, seq, trained=False)
    if candidate.recompute == "full":  # every layer's forward again (not the head's)
        flops += tokens * (flops_per_token(model, seq, trained=False) - 2 * model.vocab_size * h)
    elif candidate.recompute == "selective":  # the core attention's forward again
        flops += tokens * 2 * layers * q_dim(model) * seq
    return flops


def step_time(model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster) -> dict[str, float]:
    """Seconds per optimizer step, by part: compute (`step_flops` over the fill of the token slots, at the
    calibrated efficiency), the pipeline bubble, the communication not hidden behind compute, and the optimizer
    step over the rank's shard of the weights."""
    layout = candidate.layout
    world, t, p, c, dp = cluster.world, layout.tp, layout.pp, layout.cp, layout.dp
    fill = workload.pack_fill if candidate.packing else workload.padded_fill
    compute = step_flops(model, candidate, workload) / fill / cluster.flops_per_s
    microbatches = microbatches_per_step(workload, candidate)
    bubble = compute * (p - 1) / (layout.vpp * microbatches) if p > 1 else 0.0
    # DP: gradients reduce-scattered (fp32) and weights all-gathered (bf16) over DP x CP, mostly overlapped
    layers, lora = model.num_hidden_layers, workload.lora_rank > 0
    shard_params = lora_params(model, workload.lora_rank, t) * layers / p if lora else params(model) / (t * p)
    group = dp * c
    dp_bytes = (group - 1) / group * shard_params * (4 + candidate.width) if group > 1 else 0
    intra, inter = cluster.gpu.intra_node_gbs * 1e9, cluster.inter_node_gbs * 1e9
    dp_link = inter if world > cluster.gpus_per_node and t * p * c <= cluster.gpus_per_node else intra
    exposed = 0.2 if candidate.overlap_grad_reduce else 1.0
    shard = group if candidate.distributed_optimizer else 1
    parts = {
        "compute": compute,
        "bubble": bubble,
        **_activation_comm(model, candidate, workload, cluster, fill, microbatches),
        "dp_comm": exposed * dp_bytes / dp_link,
        "optimizer": OPTIMIZER_BYTES_PER_PARAM * shard_params / shard / (cluster.gpu.memory_gbs * 1e9),
    }
    return parts | {"total": sum(parts.values())}


def _activation_comm(
    model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster, fill: float, microbatches: float
) -> dict[str, float]:
    """Seconds of TP's and CP's activation collectives per step (bandwidth and per-collective latency)."""
    layout, width = candidate.layout, candidate.width
    t, p, c, layers = layout.tp, layout.pp, layout.cp, model.num_hidden_layers
    intra, inter = cluster.gpu.intra_node_gbs * 1e9, cluster.inter_node_gbs * 1e9
    # forward, backward, and the reference's and the full recompute's extra forwards
    passes = 2 + (1 if workload.reference == "online" else 0) + (1 if candidate.recompute == "full" else 0)
    tokens = workload.global_batch * computed_tokens(workload, candidate)
    local_tokens = tokens / fill / (layout.dp * c)  # token slots one TP group handles per step
    collectives = 2 * layers / p * passes * microbatches  # per rank and step, for TP and for CP alike
    latency = cluster.collective_latency_us * 1e-6
    # TP: two all-reduces (or all-gather + reduce-scatter) of the activations per layer and pass, ring volume
    tp_bytes = 2 * (t - 1) / t * local_tokens * model.hidden_size * width * 2 * layers / p * passes
    tp_link = intra if t <= cluster.gpus_per_node else inter
    # CP: K and V gathered per layer in forward, their gradients reduce-scattered in backward
    cp_bytes = (c - 1) / c * local_tokens * 2 * kv_dim(model) / t * width * layers / p * passes
    cp_link = intra if t * c <= cluster.gpus_per_node else inter
    return {
        "tp_comm": tp_bytes / tp_link + collectives * latency if t > 1 else 0.0,
        "cp_comm": cp_bytes / cp_link + collectives * latency if c > 1 else 0.0,
    }


def plan(model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster) -> Plan:
    """One candidate's prediction (its layout placed on the cluster's GPUs, see `Candidate.on`); `fits` says
    whether its peak stays within the usable GPU memory."""
    memory = memory_per_gpu(model, candidate, workload, cluster)
    times = step_time(model, candidate, workload, cluster)
    steps = math.ceil(workload.pairs * workload.epochs / workload.global_batch)
    total_s = steps * times["total"]
    if workload.reference == "precomputed":  # one forward pass over the data before training
        computed = workload.pairs * computed_tokens(workload, candidate)
        total_s += computed * flops_per_token(model, workload.mean_tokens / 2, False) / cluster.flops_per_s
    tokens = workload.global_batch * workload.mean_tokens  # as TRL counts them: sharing shows as speed
    return Plan(
        candidate=candidate,
        memory_gib=memory,
        step_s=times["total"],
        time_s=times,
        tokens_per_s_per_gpu=tokens / times["total"] / cluster.world,
        workload_h=total_s / 3600,
        fits=memory["total"] <= cluster.gpu.memory_gib * cluster.usable_memory,
    )


def check_layout(model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster) -> list[str]:
    """Why a candidate cannot run on the cluster (empty when it can): `Layout`'s rules, the ones the trainer
    enforces, each failing rule's message once; and a pack's size."""
    layout = candidate.layout
    sizes = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    try:
        placed = Layout.for_world(cluster.world, **sizes)
    except ConfigError as err:
        return [str(err)]
    problems = []
    if placed != layout:
        problems.append(f"DP={layout.dp} makes {layout.world} GPUs, not the cluster's {cluster.world}")
    rules = (
        partial(layout.check_model, model.num_attention_heads, model.num_key_value_heads, model.num_hidden_layers),
        partial(layout.check_batch, workload.global_batch, candidate.micro_batch, candidate.packing),
        partial(layout.check_rows, candidate.packing),
        partial(layout.check_attention, "auto", model.position_embedding),  # e.g. ALiBi has no CP
    )
    for rule in rules:
        try:
            rule()
        except ConfigError as err:
            problems.append(str(err))
    # the data rule (a pack holds whole pairs), per pair here: the workload has no per-sequence data.max_length
    if candidate.packing and microbatch_tokens(workload, candidate) < workload.max_tokens:
        problems.append("a pack must hold the longest pair")
    if candidate.share_prompt and layout.cp > 1:
        problems.append("a shared prompt needs CP=1 (context parallelism cuts rows into chunks)")
    return problems


def search(model: ModelConfig, workload: Workload, cluster: Cluster, top: int = 10) -> list[Plan]:
    """Every valid candidate over TP (within a node), PP with 1, 2 or 4 model chunks a stage (VPP), CP, micro-batch
    or pack size and recompute, with sequence parallelism when TP > 1 and the distributed optimizer: those that
    fit, fastest first."""
    world = cluster.world
    tps = [t for t in (1, 2, 4, 8) if t <= cluster.gpus_per_node]
    pps = [p for p in (1, 2, 4, 8, 16) if p <= max(1, model.num_hidden_layers // 2)]
    cps = [1, 2, 4, 8] if workload.max_tokens >= 16384 else [1]
    plans = []
    for t, p, c, recompute in itertools.product(tps, pps, cps, RECOMPUTE):
        for v in (1, 2, 4) if p > 1 else (1,):
            plans += _fitting(model, workload, cluster, world, t, p, c, v, recompute)
    return sorted(plans, key=lambda x: (x.step_s, x.memory_gib["total"]))[:top]


def _fitting(
    model: ModelConfig, workload: Workload, cluster: Cluster, world: int, t: int, p: int, c: int, v: int, recompute: str
) -> list[Plan]:
    """The candidates of one layout (each micro-batch or pack size) that are valid and fit."""
    shapes = (
        [dict(packing=False, micro_batch=m) for m in (1, 2, 4, 8)]
        if c > 1
        else [dict(packing=True, pack_tokens=k * workload.max_tokens) for k in (1, 2, 4)]
    )
    plans = []
    for shape in shapes:
        try:
            candidate = Candidate.on(
                world,
                tp=t,
                pp=p,
                cp=c,
                vpp=v,
                sequence_parallel=t > 1,
                recompute=recompute,
                share_prompt=c == 1,
                **shape,
            )
        except ConfigError:  # TP x PP x CP does not divide the world
            continue
        if check_layout(model, candidate, workload, cluster):
            continue
        prediction = plan(model, candidate, workload, cluster)
        if prediction.fits:
            plans.append(prediction)
    return plans
