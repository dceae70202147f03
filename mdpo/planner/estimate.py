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
from mdpo.planner.models import (
    attention_params,
    expert_params,
    flops_per_token,
    kv_dim,
    lora_params,
    mlp_params,
    moe_gate_params,
    params,
    q_dim,
    score_dims,
    shared_expert_params,
)

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
    # MoE: the load-balancing loss weight (dpo.router_aux_loss_coef); None = the model's own, 0 = off (any layout:
    # the trainer takes Megatron's per-layer loss where transformers' is not exact)
    router_aux_loss_coef: float | None = None

    def aux_loss(self, model: ModelConfig) -> float:
        """The load-balancing loss weight in force for `model` (0 for a dense one), as TrainConfig resolves it."""
        return model.aux_loss_coef(self.router_aux_loss_coef)


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
        ep: int = 1,
        etp: int | None = None,
        **settings: Any,
    ) -> Candidate:
        """The candidate on `world` GPUs: DP is what TP x PP x CP leave (a ConfigError when they do not divide it,
        when EP x ETP do not divide a stage's ranks, or when the sizes break their own rules)."""
        sizes = dict(tp=tp, pp=pp, cp=cp, vpp=vpp, sequence_parallel=sequence_parallel, ep=ep, etp=etp)
        return cls(Layout.for_world(world, **sizes, wording=PLANNER_WORDING), **settings)

    @property
    def width(self) -> int:
        """Bytes per weight or activation value."""
        return 2 if self.precision == "bf16" else 4

    def as_dict(self) -> dict[str, Any]:
        """The sizes (tp, pp, cp, dp, vpp, sequence_parallel, ep, etp) and the settings, flat: `mdpo plan --json`'s
        layout."""
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
    model: ModelConfig, candidate: Candidate, norm_saves: int = 1, key_ratio: float = 1.0, moe: bool = False
) -> float:
    """Bytes autograd keeps per token and layer (for one micro-batch in flight), from what each op saves in
    Megatron's layers with flash-style attention: the two norms' saved tensors and their matmuls' inputs
    ((2 x norm_saves + 2)h; split over TP with sequence parallelism), q and the key/value heads repeated to the
    query heads, the attention output and the projection's input (5q/TP, q = heads x head size, the hidden size
    for most models; selective recompute keeps instead q and
    k after the rotary embedding, the fused QKV output the value is a view of, and the projection input), and in
    the MLP the fused gate/up output, the silu, the up half plus Megatron's glu_linear_offset (a copy), their
    product as the down projection's input (5f/TP; 3f/TP with the fused SwiGLU, which keeps only the gate/up output
    and the product); an MoE layer (`moe`) keeps instead what `moe_bytes_per_token` says. Full recompute keeps only
    each layer's input (one layer
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
    if model.is_mla:
        attention = latent_attention_bytes(model, t)
    if key_ratio > 1 and candidate.recompute != "selective":  # a shared prompt's keys are gathered per response
        attention += 2 * (key_ratio - 1) * q / t
    mlp = (3 if candidate.fused_swiglu else 5) * f / t
    return width * (norms + attention) + (moe_bytes_per_token(model, candidate) if moe else width * mlp)


def latent_attention_bytes(model: ModelConfig, tp: int) -> float:
    """Values per token multi-latent attention keeps (in place of `activation_bytes_per_token_layer`'s attention):
    the q and kv latents, each also as its norm's input, whole on every TP rank (Megatron gathers them), then per TP
    rank the kv up projection's output (heads x (nope + v)), q and k after RoPE (heads x (nope + rope) each), the
    attention output and the projection's input (heads x v each)."""
    latents = 2 * ((model.q_lora_rank or 0) + model.kv_lora_rank + model.qk_rope_head_dim)
    qk, v = score_dims(model)
    up = model.num_attention_heads * (model.qk_nope_head_dim + model.v_head_dim)
    return latents + (up + 2 * qk + 2 * v) / tp


def moe_bytes_per_token(model: ModelConfig, candidate: Candidate) -> float:
    """What an MoE layer's router and experts keep per token of the micro-batch, routing balanced: each token's top-k
    copies of its hidden vector, dispatched (all-to-all over EP) to the ranks of its experts and all-gathered over
    ETP (the first expert matmul's input: k ETP h / TP per token, TP's sequence-parallel share of the tokens each
    gathered ETP ways), and per copy the expert's SwiGLU on 1/ETP of its width w: the gate/up output, the silu, the
    up half's copy, their product, and that product times the routing weight as the down projection's input
    (6w/ETP; 3w/ETP with the fused SwiGLU, which keeps the gate/up output and the weighted product); the router's
    scores over the E experts and its routing map (a byte an expert), the top-k probabilities twice and two int64
    index lists (per token of this rank's share). A shared expert keeps what a dense MLP of its width does (5s/TP;
    3s/TP fused) and, for its gate's product, its output and the sigmoid (h + 1 per token of this rank's share)."""
    layout, width, k = candidate.layout, candidate.width, model.moe_topk
    copies = k * layout.expert_tp / layout.tp
    swiglu = (3 if candidate.fused_swiglu else 6) * model.expert_width / layout.expert_tp
    routing = (width + 1) * model.num_experts + (2 * width + 16) * k
    share = layout.tp if layout.sequence_parallel else 1
    kept = width * copies * (model.hidden_size + swiglu) + routing / share
    if model.shared_expert_intermediate_size is not None:
        shared_swiglu = (3 if candidate.fused_swiglu else 5) * model.shared_expert_intermediate_size / layout.tp
        kept += width * (shared_swiglu + (model.hidden_size + 1) / share)
    return kept


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


def stage_layers(model: ModelConfig, layout: Layout, pp_rank: int) -> tuple[int, int]:
    """Dense and MoE layers of pipeline stage `pp_rank` (all its model chunks), where `Layout.stage_layers` puts
    them."""
    layers = {i for v in range(layout.vpp) for i in layout.stage_layers(model.num_hidden_layers, pp_rank, v)}
    moe = len(layers & set(model.expert_layers()))
    return len(layers) - moe, moe


def stage_params(model: ModelConfig, layout: Layout, pp_rank: int) -> tuple[float, float]:
    """Weights one GPU of pipeline stage `pp_rank` holds in its layers, dense and expert apart (their gradients
    reduce and their optimizer states shard over different groups): attention, norms and dense MLPs split over TP,
    a shared expert split over TP, the routers and a shared expert's gate whole (Megatron replicates them over TP),
    E / EP experts each split over ETP."""
    dense_layers, moe_layers = stage_layers(model, layout, pp_rank)
    attention, mlp = attention_params(model), mlp_params(model, model.intermediate_size)
    dense = (dense_layers + moe_layers) * attention + dense_layers * mlp + moe_layers * shared_expert_params(model)
    local_experts = moe_layers * (model.num_experts or 0) // layout.ep * mlp_params(model, model.expert_width)
    return dense / layout.tp + moe_layers * moe_gate_params(model), local_experts / layout.expert_tp


def memory_per_gpu(model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster) -> dict[str, float]:
    """Peak GiB on one GPU of the fullest pipeline stage, by part. The first stage holds the input embedding and,
    under 1F1B, up to PP micro-batches of activations; the last holds the head, one micro-batch in flight and one
    chunk of logits; with PP = 1 one stage holds all of it. (A middle stage holds less than the first, unless
    `moe_layers` gives it more MoE layers: not counted.)"""
    ranks = sorted({0, candidate.layout.pp - 1})
    stages = [_stage_memory(model, candidate, workload, cluster, rank) for rank in ranks]
    return max(stages, key=lambda stage: stage["total"])


def _stage_memory(
    model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster, pp_rank: int
) -> dict[str, float]:
    """GiB of one GPU of stage `pp_rank` by part. Dense weights' optimizer states shard over DP x CP, the experts'
    over the expert data-parallel group (distributed optimizer); LoRA trains adapters alone, besides the frozen
    base."""
    layout, width = candidate.layout, candidate.width
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    dense, experts = stage_params(model, layout, pp_rank)
    vocab_part = model.vocab_size * model.hidden_size / layout.tp  # embedding or head rows of one TP rank
    # a tied head is the embedding on one stage, a copy of it (own grads and optimizer state) on the last
    dense += vocab_part * (1 if first and last and model.tie_word_embeddings else first + last)
    logits = _logits_bytes(model, candidate, workload, vocab_part) if last else 0.0
    adapters = _stage_adapters(model, layout, pp_rank, workload.lora_rank)
    trained = (adapters, 0.0) if workload.lora_rank else (dense, experts)
    shards = (layout.dp * layout.cp, layout.expert_dp) if candidate.distributed_optimizer else (1, 1)
    optimizer_per_param = 12 if candidate.precision == "bf16" else 8  # bf16: fp32 master + two moments
    online_copy = workload.reference == "online" and not workload.lora_rank
    parts = {
        "weights": width * (dense + experts + adapters),
        "grads": 4 * sum(trained),  # Megatron's fp32 main-grad buffer (grad_reduce_in_fp32)
        "optimizer": optimizer_per_param * (trained[0] / shards[0] + trained[1] / shards[1]),
        "reference": width * (dense + experts) if online_copy else 0.0,
        "activations": _stage_activations(model, candidate, workload, cluster, pp_rank, logits),
        "logits": logits,
    }
    return {k: v / GIB for k, v in parts.items()} | {"total": sum(parts.values()) / GIB}


def _stage_adapters(model: ModelConfig, layout: Layout, pp_rank: int, rank: int) -> float:
    """LoRA adapters of one GPU of stage `pp_rank` (none on experts: an MoE layer's attention only)."""
    dense_layers, moe_layers = stage_layers(model, layout, pp_rank)
    return dense_layers * lora_params(model, rank, layout.tp) + moe_layers * lora_params(
        model, rank, layout.tp, mlp=False
    )


def _logits_bytes(model: ModelConfig, candidate: Candidate, workload: Workload, vocab_part: float) -> float:
    """One chunk of logits (training.vocab_head), at its fullest in backward: the recomputed matmul and its fp32
    softmax gradient (in bf16 also the matmul's bf16 output and the gradient cast back, 8 bytes a value; fp32 works
    in place, 4); and, while it is alive, the output layer's weight gradient in the weights' dtype, before DDP adds
    it into the fp32 buffer."""
    tokens = microbatch_tokens(workload, candidate) / candidate.layout.cp
    rows = min(tokens, candidate.logprob_chunk_tokens)
    per_value = 8 if candidate.width == 2 else 4
    return rows * model.vocab_size / candidate.layout.tp * per_value + candidate.width * vocab_part


def _stage_activations(
    model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster, pp_rank: int, logits: float
) -> float:
    """Activation bytes of stage `pp_rank`: its dense and MoE layers' per micro-batch in flight, the last stage's
    final norm, and under full recompute the one layer backward rebuilds (the larger kind), once the logits are
    gone."""
    layout = candidate.layout
    tokens = microbatch_tokens(workload, candidate) / layout.cp
    key_ratio = workload.mean_tokens / computed_tokens(workload, candidate)
    dense_layers, moe_layers = stage_layers(model, layout, pp_rank)
    per_layer = partial(activation_bytes_per_token_layer, model, candidate, cluster.norm_saves, key_ratio)
    layers = dense_layers * per_layer() + (moe_layers * per_layer(moe=True) if moe_layers else 0.0)
    activations = layers * tokens * _in_flight(candidate, workload, pp_rank == 0)
    if pp_rank == layout.pp - 1:  # the final norm's saved tensors
        activations += candidate.width * cluster.norm_saves * model.hidden_size * tokens
    if candidate.recompute == "full":
        whole = partial(
            activation_bytes_per_token_layer, model, replace(candidate, recompute="none"), cluster.norm_saves
        )
        kept = max(whole(moe=moe) for moe, count in ((False, dense_layers), (True, moe_layers)) if count)
        activations += max(0.0, kept * tokens - logits)
    return activations


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
        flops += tokens * layers * sum(score_dims(model)) * seq
    return flops


def rank_params(model: ModelConfig, candidate: Candidate, workload: Workload) -> tuple[float, float]:
    """Trained weights of one GPU (a stage's share of the model), dense and expert apart: what its gradient
    reduction and its optimizer step move. LoRA: the adapters alone (none on experts)."""
    layout = candidate.layout
    t, p, moe_layers = layout.tp, layout.pp, len(model.expert_layers())
    if workload.lora_rank:
        dense_layers = model.num_hidden_layers - moe_layers
        adapters = dense_layers * lora_params(model, workload.lora_rank, t)
        return (adapters + moe_layers * lora_params(model, workload.lora_rank, t, mlp=False)) / p, 0.0
    experts, routers = expert_params(model), moe_layers * moe_gate_params(model)
    return ((params(model) - experts - routers) / t + routers) / p, experts / (layout.ep * layout.expert_tp * p)


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
    # DP: gradients reduce-scattered (fp32) and weights all-gathered (bf16), mostly overlapped: the dense weights'
    # over DP x CP, the experts' over the expert data-parallel group
    dense, experts = rank_params(model, candidate, workload)
    groups = (dp * c, layout.expert_dp)
    dp_bytes = ((groups[0] - 1) / groups[0] * dense + (groups[1] - 1) / groups[1] * experts) * (4 + candidate.width)
    intra, inter = cluster.gpu.intra_node_gbs * 1e9, cluster.inter_node_gbs * 1e9
    dp_link = inter if world > cluster.gpus_per_node and t * p * c <= cluster.gpus_per_node else intra
    exposed = 0.2 if candidate.overlap_grad_reduce else 1.0
    shards = groups if candidate.distributed_optimizer else (1, 1)
    parts = {
        "compute": compute,
        "bubble": bubble,
        **_activation_comm(model, candidate, workload, cluster, fill, microbatches),
        "dp_comm": exposed * dp_bytes / dp_link,
        "optimizer": OPTIMIZER_BYTES_PER_PARAM
        * (dense / shards[0] + experts / shards[1])
        / (cluster.gpu.memory_gbs * 1e9),
    }
    return parts | {"total": sum(parts.values())}


def _activation_comm(
    model: ModelConfig, candidate: Candidate, workload: Workload, cluster: Cluster, fill: float, microbatches: float
) -> dict[str, float]:
    """Seconds of TP's and CP's activation collectives and the MoE dispatcher's per step (bandwidth and
    per-collective latency)."""
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
    keys_values = sum(score_dims(model)) if model.is_mla else 2 * kv_dim(model)  # MLA's keys and values per head
    cp_bytes = (c - 1) / c * local_tokens * keys_values / t * width * layers / p * passes
    cp_link = intra if t * c <= cluster.gpus_per_node else inter
    return {
        "tp_comm": tp_bytes / tp_link + collectives * latency if t > 1 else 0.0,
        "cp_comm": cp_bytes / cp_link + collectives * latency if c > 1 else 0.0,
        "ep_comm": _expert_comm(model, candidate, cluster, local_tokens * passes, microbatches * passes),
    }


def _expert_comm(
    model: ModelConfig, candidate: Candidate, cluster: Cluster, token_passes: float, pass_calls: float
) -> float:
    """Seconds of the MoE token dispatcher per step (`token_passes`: token slots of one TP group times passes;
    `pass_calls`: micro-batches times passes): per MoE layer and pass, each token's top-k copies of its hidden
    vector go to its experts' EP ranks and come back (two all-to-alls, (EP - 1) / EP of the copies leaving the
    rank, routing balanced), and with ETP > 1 are all-gathered to and reduce-scattered from the ETP ranks; within a
    node when EP x ETP GPUs fit in one, else at the inter-node bandwidth. Not overlapped with compute."""
    layout = candidate.layout
    ep, etp = layout.ep, layout.expert_tp
    if not model.is_moe or ep * etp == 1:
        return 0.0
    moe_layers = len(model.expert_layers()) / layout.pp
    there_and_back = 2 * token_passes / layout.tp * model.moe_topk * model.hidden_size * candidate.width * moe_layers
    volume = there_and_back * ((ep - 1) / ep + (etp - 1))
    link = cluster.gpu.intra_node_gbs if ep * etp <= cluster.gpus_per_node else cluster.inter_node_gbs
    collectives = 2 * moe_layers * pass_calls * ((ep > 1) + (etp > 1))
    return volume / (link * 1e9) + collectives * cluster.collective_latency_us * 1e-6


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
    counts = (model.num_attention_heads, model.num_key_value_heads, model.num_hidden_layers, model.num_experts)
    rules = (
        partial(layout.check_model, *counts, model.expert_width, model.linear_bias),
        partial(layout.check_batch, workload.global_batch, candidate.micro_batch, candidate.packing),
        partial(layout.check_rows, candidate.packing),
        partial(layout.check_attention, "auto", model.position_embedding),  # e.g. ALiBi has no CP
        partial(layout.check_moe, model.num_experts, workload.aux_loss(model), candidate.recompute),
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
    """Every valid candidate over TP (within a node), PP with 1, 2 or 4 model chunks a stage (VPP), CP, EP and ETP
    (MoE models), micro-batch or pack size and recompute, with sequence parallelism when TP > 1 and the
    distributed optimizer: those that fit, fastest first."""
    tps = [t for t in (1, 2, 4, 8) if t <= cluster.gpus_per_node]
    pps = [p for p in (1, 2, 4, 8, 16) if p <= max(1, model.num_hidden_layers // 2)]
    cps = [1, 2, 4, 8] if workload.max_tokens >= 16384 else [1]
    plans = []
    for t, p, c, recompute in itertools.product(tps, pps, cps, RECOMPUTE):
        for v in (1, 2, 4) if p > 1 else (1,):
            for experts in _expert_sizes(model, cluster.world, t):
                sizes = dict(tp=t, pp=p, cp=c, vpp=v, sequence_parallel=t > 1, **experts)
                plans += _fitting(model, workload, cluster, sizes, recompute)
    return sorted(plans, key=lambda x: (x.step_s, x.memory_gib["total"]))[:top]


def _expert_sizes(model: ModelConfig, world: int, tp: int) -> list[dict[str, Any]]:
    """The EP and ETP sizes searched with a TP: EP each divisor of the experts up to the world, ETP TP's own (unset)
    or, with TP > 1, 1 (whole experts); which of them a layout takes is `Layout.check_expert_groups`' rule (in
    `Candidate.on`). A dense model: none."""
    if not model.is_moe:
        return [{}]
    eps = [e for e in range(1, min(model.num_experts, world) + 1) if model.num_experts % e == 0]
    return [dict(ep=e, etp=etp) for e in eps for etp in ((None, 1) if tp > 1 else (None,))]


def _fitting(
    model: ModelConfig, workload: Workload, cluster: Cluster, sizes: dict[str, Any], recompute: str
) -> list[Plan]:
    """The candidates of one layout (`Candidate.on`'s sizes; each micro-batch or pack size) that are valid and
    fit."""
    shapes = (
        [dict(packing=False, micro_batch=m) for m in (1, 2, 4, 8)]
        if sizes["cp"] > 1
        else [dict(packing=True, pack_tokens=k * workload.max_tokens) for k in (1, 2, 4)]
    )
    plans = []
    for shape in shapes:
        try:
            candidate = Candidate.on(
                cluster.world, **sizes, recompute=recompute, share_prompt=sizes["cp"] == 1, **shape
            )
        except ConfigError:  # TP x PP x CP does not divide the world, or EP x ETP a stage's ranks
            continue
        if check_layout(model, candidate, workload, cluster):
            continue
        prediction = plan(model, candidate, workload, cluster)
        if prediction.fits:
            plans.append(prediction)
    return plans
