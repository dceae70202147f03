"""Throughput of one DPO configuration: tokens/s, step time, peak memory and MFU, as a table and a CSV row.

    python benchmarks/bench_dpo.py --model 1b --seq-len 1024 --micro-batch 2 --steps 8   # one process
    python benchmarks/bench_dpo.py --model 13b --nproc 8 --tp 4 --pp 2 ...               # torchrun, one node

`--data synthetic` (default): digit strings of the demo tokenizer, each sequence `--seq-len` tokens (a prompt of
`--prompt-len` and a response of the rest), so only the model's shape and the layout matter. `--data real`: the
200 UltraFeedback rows of ../shared/data with the Llama 2 tokenizer and the Tulu 2 template, `--seq-len` as
data.max_length, so lengths vary as users' do (the model's vocabulary must be Llama 2's 32,000: every preset's).

Tokens are counted as TRL counts them (the prompt in both sequences, `tokens_per_s`) and as the model computed them
(a shared prompt once, `computed_tokens_per_s`). MFU counts, per the standard convention, 6N FLOPs per computed
trained token, 2N per reference-forward token (none with a precomputed reference) and causal attention (12 x layers
x hidden x seq / 2 per trained token, seq the mean sequence length, a third of it per reference token), over the
steps after `--warmup` against `--peak-tflops` per GPU (default: the H100/A100/A800 bf16 dense peak when the GPU's
name says so; on CPU MFU is shown only when given).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import torch

from mdpo.config import ModelConfig
from mdpo.planner import MODELS, flops_per_token, matmul_params
from mdpo.planner.runs import run_config

# Llama 2 shapes (vocab 32000) and TinyLlama's 1.1B shape (mdpo.planner's presets); "tiny" is for CPU.
TINY = ModelConfig(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
)
PRESETS = {
    "tiny": TINY,
    "1b": MODELS["tinyllama-1.1b"],
    "7b": MODELS["llama2-7b"],
    "13b": MODELS["llama2-13b"],
}
# ../shared beside the checkout, or shared/ inside it (where the device tool puts a checkout's own)
SHARED = next(
    (p for p in (Path(__file__).resolve().parents[i] / "shared" for i in (1, 2)) if p.is_dir()),
    Path(__file__).resolve().parents[2] / "shared",
)
REAL_DATA = (SHARED / "data" / "ultrafeedback_binarized_sample_200.jsonl", SHARED / "tokenizers" / "llama2")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0}  # bf16 dense


def flops_per_step(m: ModelConfig, tokens: float, seq_len: float, reference: str) -> float:
    """Trained tokens (6N + causal attention) plus, online, a reference forward (2N + its attention)."""
    return tokens * (
        flops_per_token(m, seq_len, True) + (flops_per_token(m, seq_len, False) if reference == "online" else 0)
    )


def default_peak() -> float | None:
    """The bf16 dense peak of this GPU, when its name says which; None on CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=PRESETS, default="tiny")
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument(
        "--seq-len", type=int, default=512, help="tokens per sequence (prompt + response); real data: data.max_length"
    )
    parser.add_argument("--prompt-len", type=int, default=None, help="default: a quarter of --seq-len")
    parser.add_argument("--micro-batch", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--global-batch", type=int, default=None, help="pairs per step (default 4 micro-batches)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the averages")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node, started with torchrun")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1, help="context parallel (padded rows; TE or SDPA attention)")
    parser.add_argument("--reference", choices=("online", "precomputed", "none"), default="online")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--no-share-prompt", action="store_true", help="each pair's prompt in both sequences")
    parser.add_argument("--attention", default="auto")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers of the preset's shape kept (a 13B "
        "shape on one GPU: as many of its 40 as fit); default all",
    )
    parser.add_argument("--fused-swiglu", action="store_true", help="model.fused_swiglu (Megatron's fused SwiGLU)")
    parser.add_argument("--fused-rope", action="store_true", help="model.fused_rope (RoPE in one kernel each way)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device; default from the GPU's name")
    parser.add_argument("--csv", default="benchmarks/results.csv")
    parser.add_argument("extra", nargs="*", help="more mdpo key=value overrides")
    args = parser.parse_args()
    world, model = args.nproc, PRESETS[args.model]
    model = dataclasses.replace(
        model,
        num_hidden_layers=args.layers or model.num_hidden_layers,
        fused_swiglu=args.fused_swiglu,
        fused_rope=args.fused_rope,
    )
    run = run_config(
        model,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        steps=args.steps,
        warmup=args.warmup,
        nproc=world,
        tp=args.tp,
        pp=args.pp,
        cp=args.cp,
        reference=args.reference,
        packing=args.packing,
        attention=args.attention,
        global_batch=args.global_batch,
        prompt_len=args.prompt_len,
        extra=(*args.extra, *(["data.share_prompt=false"] if args.no_share_prompt else [])),
        real_data=REAL_DATA if args.data == "real" else None,
    )
    step_s, tokens, computed = run["step_s"], run["tokens"], run["computed_tokens"]
    reference = "online" if args.reference == "online" else "none"
    mean_sequence = tokens / (2 * run["global_batch"])  # prompt + response, as each response attends
    achieved = flops_per_step(model, computed, mean_sequence, reference) / step_s / 1e12
    peak = args.peak_tflops or default_peak()
    mfu = achieved / (peak * world) if peak else None
    row = {
        "model": args.model,
        "layers": model.num_hidden_layers,
        "fused_swiglu": model.fused_swiglu,
        "fused_rope": model.fused_rope,
        "params_b": round(matmul_params(model) / 1e9, 3),
        "data": args.data,
        "seq_len": args.seq_len,
        "mean_sequence": round(mean_sequence, 1),
        "micro_batch": args.micro_batch,
        "global_batch": run["global_batch"],
        "tp": args.tp,
        "pp": args.pp,
        "cp": args.cp,
        "world": world,
        "attention": args.attention,
        "reference": args.reference,
        "packing": args.packing,
        "share_prompt": not args.no_share_prompt,
        "step_s": round(step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "tokens_per_s_per_device": round(tokens / step_s / world, 1),
        "computed_tokens_per_s": round(computed / step_s, 1),
        "peak_memory_gib": round(run["peak_memory_gib"], 2),
        "tflops_per_device": round(achieved / world, 2),
        "mfu": round(mfu, 4) if mfu is not None else "",
    }
    width = max(map(len, row))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()))
    print(f"MFU: {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a (pass --peak-tflops)'}")
    path = Path(args.csv)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
