"""Memory and step-time planner for DPO on Megatron-Core: what one GPU holds, part by part, and how long a step
takes, for a given layout or for every feasible one, ranked.

The terms follow what mdpo builds: bf16 weights with an fp32 gradient buffer, fp32 master weights and AdamW
moments (Megatron's mixed-precision optimizer, its states sharded over DP x CP with the distributed optimizer);
a frozen bf16 reference copy when the reference runs online; activations of Megatron's layers with flash-style
attention (no [s, s] score matrix); fp32 copies of the vocab-parallel logits in the cross entropy. Time counts
model FLOPs as bench_dpo.py does (6N per trained token, 2N per reference token, causal attention), divided by the
cluster's peak times one calibrated efficiency, plus the exposed communication, the pipeline bubble and the
optimizer step (memory-bound: the bytes it moves over the GPU's memory bandwidth).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """A Llama-like decoder (Llama 2, Qwen 1.0, Baichuan 2): untied embeddings, SwiGLU, RMSNorm, GQA."""

    hidden: int
    ffn: int  # one SwiGLU branch (Qwen's config.json lists twice this)
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        attention = h * (h + 2 * kv) + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.ffn + 2 * h  # + two RMSNorm weights

    def params(self) -> int:
        """Every weight: layers, input embedding, output head and final norm."""
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden

    def matmul_params(self) -> int:
        """N of the 6N rule: the weights that do matrix work per token (the head counts, the input embedding not)."""
        return self.params() - self.vocab * self.hidden

    def flops_per_token(self, seq_len: float, trained: bool) -> float:
        """Forward + backward (trained) or forward only (a reference pass), causal attention over seq_len."""
        attention = 6 * self.layers * self.hidden * seq_len  # half of 12 L h s: causal
        return 6 * self.matmul_params() + attention if trained else 2 * self.matmul_params() + attention / 3


# Published configs (config.json of each model on the HF hub).
MODELS = {
    "llama2-7b": ModelShape(4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": ModelShape(5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": ModelShape(8192, 28672, 80, 64, 8, 32000),
    "codellama-34b": ModelShape(8192, 22016, 48, 64, 8, 32000),
    "tulu2-13b": ModelShape(5120, 13824, 40, 40, 40, 32000),
    "tulu2-70b": ModelShape(8192, 28672, 80, 64, 8, 32000),
    "qwen-7b": ModelShape(4096, 11008, 32, 32, 32, 151936, qkv_bias=True),
    "qwen-14b": ModelShape(5120, 13696, 40, 40, 40, 152064, qkv_bias=True),
    "qwen-72b": ModelShape(8192, 24576, 80, 64, 64, 152064, qkv_bias=True),
    "baichuan2-7b": ModelShape(4096, 11008, 32, 32, 32, 125696),
    "baichuan2-13b": ModelShape(5120, 13696, 40, 40, 40, 125696),
    "tinyllama-1.1b": ModelShape(2048, 5632, 22, 32, 4, 32000),
}


@dataclass(frozen=True)
class GPU:
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
# gradient buffer (4).
OPTIMIZER_BYTES_PER_PARAM = 86


@dataclass(frozen=True)
class Cluster:
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
    pairs: int = 61_000
    mean_tokens: float = 1010  # per pair: prompt + chosen + prompt + rejected
    max_tokens: int = 8192  # per pair after truncation (each sequence at most half, padded)
    epochs: float = 3
    reference: str = "precomputed"  # online | precomputed | none
    global_batch: int = 128  # pairs per optimizer step
    padded_fill: float = 0.6  # real tokens / token slots of padded micro-batches (data stats tell; packs: 0.95)
    pack_fill: float = 0.95


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B): the bubble shrinks by this factor
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective | full
    micro_batch: int = 1  # pairs per micro-batch (padded)
    packing: bool = True
    pack_tokens: int | None = None  # None: the longest pair (mdpo's default, 2 x data.max_length)
    overlap_grad_reduce: bool = True
    precision: str = "bf16"  # bf16 | fp32

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp * self.cp)

    @property
    def width(self) -> int:
        """Bytes per weight or activation value."""
        return 2 if self.precision == "bf16" else 4


@dataclass
class Plan:
    layout: Layout
    dp: int
    memory_gib: dict[str, float]  # per GPU, the fullest pipeline stage
    step_s: float
    time_s: dict[str, float]  # parts of a step
    tokens_per_s_per_gpu: float
    workload_h: float
    fits: bool

    def as_dict(self) -> dict:
        return {**asdict(self), "layout": asdict(self.layout)}


def microbatch_tokens(workload: Workload, layout: Layout) -> int:
    """Token slots of the largest micro-batch: a pack, or micro_batch pairs padded to the longest sequence."""
    if layout.packing:
        return layout.pack_tokens or workload.max_tokens
    return layout.micro_batch * workload.max_tokens


def microbatches_per_step(workload: Workload, layout: Layout, dp: int) -> float:
    """Micro-batches each DP rank runs per optimizer step (packs hold about slots x fill / mean pairs)."""
    if layout.packing:
        pairs_per_pack = max(1.0, microbatch_tokens(workload, layout) * workload.pack_fill / workload.mean_tokens)
        return max(1.0, workload.global_batch / dp / pairs_per_pack)
    return max(1.0, workload.global_batch / (dp * layout.micro_batch))


def activation_bytes_per_token_layer(model: ModelShape, layout: Layout, norm_saves: int = 1) -> float:
    """Bytes autograd keeps per token and layer (for one micro-batch in flight), from what each op saves in
    Megatron's layers with flash-style attention: the two norms' saved tensors and their matmuls' inputs
    ((2 x norm_saves + 2)h; split over TP with sequence parallelism), q and the key/value heads repeated to the
    query heads, the attention output and the projection's input (5h/TP; selective recompute keeps instead q and
    k after the rotary embedding, the fused QKV output the value is a view of, and the projection input), and in
    the MLP the fused gate/up output, the silu, the up half plus Megatron's glu_linear_offset (a copy), their
    product as the down projection's input (5f/TP). Full recompute keeps only each layer's input (one layer
    recomputed at a time is the caller's). Left out: the rotary cos/sin per layer (4 x head_dim per row position,
    under 1%)."""
    h, f, t = model.hidden, model.ffn, layout.tp
    width = layout.width
    if layout.recompute == "full":
        return width * h / (t if layout.sequence_parallel else 1)
    norms = (2 * norm_saves + 2) * h / (t if layout.sequence_parallel else 1)
    attention = 3 * (h + model.kv_dim) / t if layout.recompute == "selective" else 5 * h / t
    return width * (norms + attention + 5 * f / t)


def memory_per_gpu(model: ModelShape, layout: Layout, workload: Workload, cluster: Cluster) -> dict[str, float]:
    """Peak GiB on one GPU of the fullest pipeline stage, by part. The first stage holds the input embedding and,
    under 1F1B, up to PP micro-batches of activations; the last holds the head, one micro-batch in flight and the
    logits; with PP = 1 one stage holds all of it."""
    t, p, c = layout.tp, layout.pp, layout.cp
    dp = layout.dp(cluster.world)
    width = layout.width
    shard = dp * c if layout.distributed_optimizer else 1
    optimizer_per_param = 12 if layout.precision == "bf16" else 8  # bf16: fp32 master + two moments
    tokens = microbatch_tokens(workload, layout) / c
    layer_bytes = activation_bytes_per_token_layer(model, layout, cluster.norm_saves)
    stage_layers = math.ceil(model.layers / p)
    vocab_part = model.vocab * model.hidden / t  # embedding or head rows of one TP rank
    stages = []
    for first, last in ((True, False), (False, True)) if p > 1 else ((True, True),):
        params = stage_layers * model.layer_params() / t + vocab_part * (first + last)
        in_flight = min(p, math.ceil(microbatches_per_step(workload, layout, dp))) if first and p > 1 else 1
        activations = layer_bytes * stage_layers * tokens * in_flight
        if last:  # the final norm's saved tensors
            activations += width * cluster.norm_saves * model.hidden * tokens
        # the logits and a second copy (transposed for the loss, later their gradient); in bf16 also the cross
        # entropy's fp32 copy and the metrics' (in fp32 both work on the logits themselves)
        logits = tokens * model.vocab / t * (2 * width + (6 if width == 2 else 0)) if last else 0.0
        if layout.recompute == "full":  # backward rebuilds one layer at a time, once the logits are gone
            one_layer = activation_bytes_per_token_layer(model, replace(layout, recompute="none"), cluster.norm_saves)
            activations += max(0.0, one_layer * tokens - logits)
        parts = {
            "weights": width * params,
            "grads": 4 * params,  # Megatron's fp32 main-grad buffer (grad_reduce_in_fp32)
            "optimizer": optimizer_per_param * params / shard,
            "reference": width * params if workload.reference == "online" else 0.0,
            "activations": activations,
            "logits": logits,
        }
        stages.append({k: v / GIB for k, v in parts.items()} | {"total": sum(parts.values()) / GIB})
    return max(stages, key=lambda stage: stage["total"])


def step_time(model: ModelShape, layout: Layout, workload: Workload, cluster: Cluster) -> dict[str, float]:
    """Seconds per optimizer step, by part: compute (model FLOPs of the real tokens over the fill of the token
    slots, at the calibrated efficiency), the pipeline bubble, the communication not hidden behind compute, and
    the optimizer step over the rank's shard of the weights."""
    world, t, p, c = cluster.world, layout.tp, layout.pp, layout.cp
    dp = layout.dp(world)
    seq = workload.mean_tokens / 2
    tokens = workload.global_batch * workload.mean_tokens
    flops = tokens * model.flops_per_token(seq, trained=True)
    if workload.reference == "online":
        flops += tokens * model.flops_per_token(seq, trained=False)
    if layout.recompute == "full":  # every layer's forward again (not the head's)
        flops += tokens * (model.flops_per_token(seq, trained=False) - 2 * model.vocab * model.hidden)
    elif layout.recompute == "selective":  # the core attention's forward again
        flops += tokens * 2 * model.layers * model.hidden * seq
    fill = workload.pack_fill if layout.packing else workload.padded_fill
    compute = flops / fill / cluster.flops_per_s
    microbatches = microbatches_per_step(workload, layout, dp)
    bubble = compute * (p - 1) / (layout.vpp * microbatches) if p > 1 else 0.0
    width = layout.width
    intra, inter = cluster.gpu.intra_node_gbs * 1e9, cluster.inter_node_gbs * 1e9
    # forward, backward, and the reference's and the full recompute's extra forwards
    passes = 2 + (1 if workload.reference == "online" else 0) + (1 if layout.recompute == "full" else 0)
    local_tokens = tokens / fill / (dp * c)  # token slots one TP group handles per step
    collectives = 2 * model.layers / p * passes * microbatches  # per rank and step, for TP and for CP alike
    latency = cluster.collective_latency_us * 1e-6
    # TP: two all-reduces (or all-gather + reduce-scatter) of the activations per layer and pass, ring volume
    tp_bytes = 2 * (t - 1) / t * local_tokens * model.hidden * width * 2 * model.layers / p * passes
    tp_link = intra if t <= cluster.gpus_per_node else inter
    # CP: K and V gathered per layer in forward, their gradients reduce-scattered in backward
    cp_bytes = (c - 1) / c * local_tokens * 2 * model.kv_dim / t * width * model.layers / p * passes
    # DP: gradients reduce-scattered (fp32) and weights all-gathered (bf16) over DP x CP, mostly overlapped
    shard_params = model.params() / (t * p)
    group = dp * c
    dp_bytes = (group - 1) / group * shard_params * (4 + width) if group > 1 else 0
    dp_link = inter if world > cluster.gpus_per_node and t * p * c <= cluster.gpus_per_node else intra
    exposed = 0.2 if layout.overlap_grad_reduce else 1.0
    shard = group if layout.distributed_optimizer else 1
    optimizer = OPTIMIZER_BYTES_PER_PARAM * shard_params / shard / (cluster.gpu.memory_gbs * 1e9)
    parts = {
        "compute": compute,
        "bubble": bubble,
        "tp_comm": tp_bytes / tp_link + collectives * latency if t > 1 else 0.0,
        "cp_comm": cp_bytes / (intra if t * c <= cluster.gpus_per_node else inter) + collectives * latency
        if c > 1
        else 0.0,
        "dp_comm": exposed * dp_bytes / dp_link,
        "optimizer": optimizer,
    }
    return parts | {"total": sum(parts.values())}


def plan(model: ModelShape, layout: Layout, workload: Workload, cluster: Cluster) -> Plan:
    """One layout's prediction; `fits` says whether its peak stays within the usable GPU memory."""
    world = cluster.world
    dp = layout.dp(world)
    memory = memory_per_gpu(model, layout, workload, cluster)
    times = step_time(model, layout, workload, cluster)
    steps = math.ceil(workload.pairs * workload.epochs / workload.global_batch)
    total_s = steps * times["total"]
    if workload.reference == "precomputed":  # one forward pass over the data before training
        flops = workload.pairs * workload.mean_tokens * model.flops_per_token(workload.mean_tokens / 2, False)
        total_s += flops / cluster.flops_per_s
    tokens = workload.global_batch * workload.mean_tokens
    return Plan(
        layout=layout,
        dp=dp,
        memory_gib=memory,
        step_s=times["total"],
        time_s=times,
        tokens_per_s_per_gpu=tokens / times["total"] / world,
        workload_h=total_s / 3600,
        fits=memory["total"] <= cluster.gpu.memory_gib * cluster.usable_memory,
    )


def check_layout(model: ModelShape, layout: Layout, workload: Workload, cluster: Cluster) -> list[str]:
    """Why a layout cannot run at all (empty when it can): the same rules the trainer enforces."""
    world = cluster.world
    problems = []
    if world % (layout.tp * layout.pp * layout.cp):
        problems.append(f"world {world} not divisible by TP x PP x CP = {layout.tp * layout.pp * layout.cp}")
        return problems
    dp = layout.dp(world)
    if model.heads % layout.tp or model.kv_heads % layout.tp:
        problems.append(f"TP={layout.tp} does not divide the heads ({model.heads}, {model.kv_heads} key/value)")
    if model.layers % (layout.pp * layout.vpp):
        problems.append(f"PP x VPP = {layout.pp * layout.vpp} does not divide {model.layers} layers")
    per_step = dp if layout.packing else dp * layout.micro_batch
    if workload.global_batch % per_step:
        problems.append(f"global batch {workload.global_batch} not divisible by {per_step}")
    if layout.cp > 1 and layout.packing:
        problems.append("context parallelism takes padded micro-batches")
    if layout.sequence_parallel and layout.tp == 1:
        problems.append("sequence parallelism needs TP > 1")
    if layout.packing and (layout.pack_tokens or workload.max_tokens) < workload.max_tokens:
        problems.append("a pack must hold the longest pair")
    return problems


def search(model: ModelShape, workload: Workload, cluster: Cluster, top: int = 10) -> list[Plan]:
    """Every valid layout over TP (within a node), PP, CP, micro-batch or pack size and recompute, with sequence
    parallelism when TP > 1 and the distributed optimizer: those that fit, fastest first."""
    world = cluster.world
    tps = [t for t in (1, 2, 4, 8) if t <= cluster.gpus_per_node]
    pps = [p for p in (1, 2, 4, 8, 16) if p <= max(1, model.layers // 2)]
    cps = [1, 2, 4, 8] if workload.max_tokens >= 16384 else [1]
    candidates = []
    for t, p, c, recompute in itertools.product(tps, pps, cps, ("none", "selective", "full")):
        shapes = [dict(packing=False, micro_batch=m) for m in (1, 2, 4, 8)] if c > 1 else [
            dict(packing=True, pack_tokens=k * workload.max_tokens) for k in (1, 2, 4)
        ]  # fmt: skip
        for shape in shapes:
            layout = Layout(tp=t, pp=p, cp=c, sequence_parallel=t > 1, recompute=recompute, **shape)
            if t * p * c > world or check_layout(model, layout, workload, cluster):
                continue
            candidate = plan(model, layout, workload, cluster)
            if candidate.fits:
                candidates.append(candidate)
    return sorted(candidates, key=lambda x: (x.step_s, x.memory_gib["total"]))[:top]


def model_shape(name_or_path: str) -> ModelShape:
    """A preset name, or a HF model folder / config.json of a supported family."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    from pathlib import Path

    from mdpo.config import ModelConfig, apply_hf_config
    from mdpo.errors import ConfigError

    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"--model {name_or_path!r}: neither a preset ({', '.join(MODELS)}) nor a HF folder")
    model = ModelConfig(hf_config=str(path.parent if path.name == "config.json" else path))
    apply_hf_config(model)
    heads = model.num_attention_heads
    return ModelShape(model.hidden_size, model.intermediate_size, model.num_hidden_layers, heads,
                      model.num_key_value_heads or heads, model.vocab_size, model.qkv_bias)  # fmt: skip


def add_arguments(parser):  # noqa: ANN001, ANN201 - argparse types
    """`mdpo plan` / tools/plan.py flags: model, cluster, workload, and optionally one layout."""
    parser.add_argument("--model", required=True, help=f"a preset ({', '.join(MODELS)}) or a HF folder")
    parser.add_argument("--gpu", choices=GPUS, default="a800-80g")
    parser.add_argument("--gpu-memory-gib", type=float, help="override the GPU preset's memory")
    parser.add_argument("--peak-tflops", type=float, help="override the GPU preset's dense bf16 peak")
    parser.add_argument("--intra-node-gbs", type=float, help="override the GPU preset's NVLink GB/s per GPU")
    parser.add_argument("--memory-gbs", type=float, help="override the GPU preset's memory bandwidth (GB/s)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--inter-node-gbs", type=float, default=Cluster.inter_node_gbs, help="GB/s per GPU")
    parser.add_argument("--efficiency", type=float, default=Cluster.efficiency, help="achieved fraction of peak")
    w = Workload()
    parser.add_argument("--pairs", type=int, default=w.pairs)
    parser.add_argument("--mean-tokens", type=float, default=w.mean_tokens, help="per pair (both sequences)")
    parser.add_argument("--max-tokens", type=int, default=w.max_tokens, help="per pair, after truncation")
    parser.add_argument("--epochs", type=float, default=w.epochs)
    parser.add_argument("--reference", choices=("online", "precomputed", "none"), default=w.reference)
    parser.add_argument("--global-batch", type=int, default=w.global_batch, help="pairs per step")
    parser.add_argument("--padded-fill", type=float, default=w.padded_fill, help="real / padded tokens")
    layout = parser.add_argument_group("layout (give --tp to predict one layout; without it all are searched)")
    layout.add_argument("--tp", type=int)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--cp", type=int, default=1)
    layout.add_argument("--vpp", type=int, default=1)
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--no-distributed-optimizer", action="store_true")
    layout.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    layout.add_argument("--micro-batch", type=int, default=1, help="pairs per padded micro-batch")
    layout.add_argument("--no-packing", action="store_true")
    layout.add_argument("--pack-tokens", type=int)
    parser.add_argument("--top", type=int, default=10, help="layouts listed by the search")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run(args) -> str:  # noqa: ANN001 - argparse namespace
    """The report `mdpo plan` prints: one layout's breakdown, or the search's ranking."""
    import json

    from mdpo.errors import ConfigError

    model = model_shape(args.model)
    preset = GPUS[args.gpu]
    gpu = GPU(
        args.gpu_memory_gib or preset.memory_gib,
        args.peak_tflops or preset.peak_tflops,
        args.intra_node_gbs or preset.intra_node_gbs,
        args.memory_gbs or preset.memory_gbs,
    )
    cluster = Cluster(gpu, args.nodes, args.gpus_per_node, args.inter_node_gbs, args.efficiency)
    workload = Workload(args.pairs, args.mean_tokens, args.max_tokens, args.epochs, args.reference,
                        args.global_batch, args.padded_fill)  # fmt: skip
    if args.tp is not None:
        layout = Layout(args.tp, args.pp, args.cp, args.vpp, args.sequence_parallel, not args.no_distributed_optimizer,
                        args.recompute, args.micro_batch, not args.no_packing, args.pack_tokens)  # fmt: skip
        problems = check_layout(model, layout, workload, cluster)
        if problems:
            raise ConfigError("; ".join(problems))
        plans = [plan(model, layout, workload, cluster)]
    else:
        plans = search(model, workload, cluster, args.top)
        if not plans:
            raise ConfigError(f"no layout fits {args.model} on {cluster.world} x {args.gpu}")
    if args.json:
        return json.dumps([p.as_dict() for p in plans], indent=2)
    head = (f"{args.model} ({model.params() / 1e9:.2f}B) on {args.nodes} x {args.gpus_per_node} {args.gpu}; "
            f"{workload.pairs} pairs x {workload.epochs:g} epochs, {workload.mean_tokens:g} tokens/pair, "
            f"reference {workload.reference}, efficiency {cluster.efficiency:g}")  # fmt: skip
    rows = ["| TP | PP | CP | DP | SP | recompute | micro-batch | GiB/GPU (weights+grads+optim+ref / act / logits) "
            "| fits | step s | tokens/s/GPU | workload h |", "|" + "---|" * 12]  # fmt: skip
    for p in plans:
        lay, mem = p.layout, p.memory_gib
        static = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["reference"]
        batch = f"pack {lay.pack_tokens or workload.max_tokens}" if lay.packing else f"{lay.micro_batch} pairs"
        rows.append(f"| {lay.tp} | {lay.pp} | {lay.cp} | {p.dp} | {'on' if lay.sequence_parallel else 'off'} "
                    f"| {lay.recompute} | {batch} | {mem['total']:.1f} ({static:.1f} / {mem['activations']:.1f} / "
                    f"{mem['logits']:.1f}) | {'yes' if p.fits else 'NO'} | {p.step_s:.2f} | "
                    f"{p.tokens_per_s_per_gpu:,.0f} | {p.workload_h:.2f} |")  # fmt: skip
    return "\n".join([head, *rows])
