"""`mdpo plan` (and tools/plan.py): the flags, and the report it prints, a table or JSON."""

from __future__ import annotations

import argparse
import json

from mdpo.config import RECOMPUTE, REFERENCE_MODES
from mdpo.errors import ConfigError
from mdpo.planner.estimate import GPU, GPUS, Candidate, Cluster, Plan, Workload, check_layout, plan, search
from mdpo.planner.models import MODELS, active_params, model_shape, params


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
    parser.add_argument("--prompt-tokens", type=float, default=w.prompt_tokens, help="per pair: what sharing saves")
    parser.add_argument("--epochs", type=float, default=w.epochs)
    parser.add_argument("--reference", choices=REFERENCE_MODES, default=w.reference)
    parser.add_argument("--global-batch", type=int, default=w.global_batch, help="pairs per step")
    parser.add_argument("--padded-fill", type=float, default=w.padded_fill, help="real / padded tokens")
    parser.add_argument("--lora-rank", type=int, default=w.lora_rank, help="LoRA's rank (0: full tuning)")
    parser.add_argument(
        "--router-aux-loss-coef",
        type=float,
        help="MoE: the load-balancing loss weight (default the model's; 0: off, which allows PP > 1)",
    )
    layout = parser.add_argument_group("layout (give --tp to predict one layout; without it all are searched)")
    layout.add_argument("--tp", type=int)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--cp", type=int, default=1)
    layout.add_argument("--vpp", type=int, default=1)
    layout.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    layout.add_argument("--etp", type=int, help="expert-tensor-parallel size (MoE models; default TP)")
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--no-distributed-optimizer", action="store_true")
    layout.add_argument("--recompute", choices=RECOMPUTE, default="none")
    layout.add_argument("--micro-batch", type=int, default=1, help="pairs per padded micro-batch")
    layout.add_argument("--no-packing", action="store_true")
    layout.add_argument("--pack-tokens", type=int)
    layout.add_argument("--no-share-prompt", action="store_true", help="each pair's prompt in both sequences")
    layout.add_argument("--logprob-chunk-tokens", type=int, default=Candidate.logprob_chunk_tokens)
    layout.add_argument("--fused-swiglu", action="store_true", help="model.fused_swiglu (3f MLP activations)")
    parser.add_argument("--top", type=int, default=10, help="layouts listed by the search")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _cluster(args: argparse.Namespace) -> Cluster:
    """The GPU preset with the flags' overrides, on the flags' nodes."""
    preset = GPUS[args.gpu]
    gpu = GPU(
        args.gpu_memory_gib or preset.memory_gib,
        args.peak_tflops or preset.peak_tflops,
        args.intra_node_gbs or preset.intra_node_gbs,
        args.memory_gbs or preset.memory_gbs,
    )
    return Cluster(gpu, args.nodes, args.gpus_per_node, args.inter_node_gbs, args.efficiency)


def _candidate(args: argparse.Namespace, world: int) -> Candidate:
    """The one layout the flags name (`--tp` given)."""
    return Candidate.on(
        world,
        tp=args.tp,
        pp=args.pp,
        cp=args.cp,
        vpp=args.vpp,
        sequence_parallel=args.sequence_parallel,
        ep=args.ep,
        etp=args.etp,
        distributed_optimizer=not args.no_distributed_optimizer,
        recompute=args.recompute,
        micro_batch=args.micro_batch,
        packing=not args.no_packing,
        pack_tokens=args.pack_tokens,
        share_prompt=not args.no_share_prompt and args.cp == 1,
        logprob_chunk_tokens=args.logprob_chunk_tokens,
        fused_swiglu=args.fused_swiglu,
    )


def run(args: argparse.Namespace) -> str:
    """The report `mdpo plan` prints: one layout's breakdown, or the search's ranking."""
    model, cluster = model_shape(args.model), _cluster(args)
    workload = Workload(
        args.pairs,
        args.mean_tokens,
        args.max_tokens,
        args.epochs,
        args.reference,
        args.global_batch,
        args.padded_fill,
        prompt_tokens=args.prompt_tokens,
        lora_rank=args.lora_rank,
        router_aux_loss_coef=args.router_aux_loss_coef,
    )
    if args.tp is not None:
        candidate = _candidate(args, cluster.world)
        problems = check_layout(model, candidate, workload, cluster)
        if problems:
            raise ConfigError("; ".join(problems))
        plans = [plan(model, candidate, workload, cluster)]
    else:
        plans = search(model, workload, cluster, args.top)
        if not plans:
            raise ConfigError(f"no layout fits {args.model} on {cluster.world} x {args.gpu}")
    if args.json:
        return json.dumps([p.as_dict() for p in plans], indent=2)
    active = f", {active_params(model) / 1e9:.2f}B active" if model.is_moe else ""
    head = (
        f"{args.model} ({params(model) / 1e9:.2f}B{active}) on {args.nodes} x {args.gpus_per_node} {args.gpu}; "
        f"{workload.pairs} pairs x {workload.epochs:g} epochs, {workload.mean_tokens:g} tokens/pair, "
        f"reference {workload.reference}, efficiency {cluster.efficiency:g}"
        + (f", LoRA rank {workload.lora_rank} (base frozen)" if workload.lora_rank else "")
    )
    rows = [
        "| TP | PP (x VPP) | CP | EP (x ETP) | DP | SP | recompute | micro-batch "
        "| GiB/GPU (weights+grads+optim+ref / act / logits) "
        "| fits | step s | tokens/s/GPU | workload h |",
        "|" + "---|" * 13,
    ]
    return "\n".join([head, *rows, *(_row(p, workload) for p in plans)])


def _row(p: Plan, workload: Workload) -> str:
    c, lay, mem = p.candidate, p.layout, p.memory_gib
    static = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["reference"]
    batch = f"pack {c.pack_tokens or workload.max_tokens}" if c.packing else f"{c.micro_batch} pairs"
    pp = f"{lay.pp} x {lay.vpp}" if lay.vpp > 1 else f"{lay.pp}"
    ep = f"{lay.ep} x {lay.etp}" if lay.etp is not None else f"{lay.ep}"  # ETP shown where it is not TP's
    return (
        f"| {lay.tp} | {pp} | {lay.cp} | {ep} | {lay.dp} | {'on' if lay.sequence_parallel else 'off'} "
        f"| {c.recompute} | {batch} | {mem['total']:.1f} ({static:.1f} / {mem['activations']:.1f} / "
        f"{mem['logits']:.1f}) | {'yes' if p.fits else 'NO'} | {p.step_s:.2f} | "
        f"{p.tokens_per_s_per_gpu:,.0f} | {p.workload_h:.2f} |"
    )
