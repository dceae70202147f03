"""Throughput of one DPO configuration: tokens/s, step time, peak memory and MFU, as a table and a CSV row.

    python benchmarks/bench_dpo.py --model 1b --seq-len 1024 --micro-batch 2 --steps 8   # one process
    python benchmarks/bench_dpo.py --model 13b --nproc 8 --tp 4 --pp 2 ...               # torchrun, one node

The pairs are synthetic (digit strings of the demo tokenizer, each sequence `--seq-len` tokens: a prompt of
`--prompt-len` and a response of the rest), so only the model's shape and the layout matter. MFU counts, per the
standard convention, 6N FLOPs per trained token, 2N per reference-forward token (none with a precomputed reference)
and causal attention (12 x layers x hidden x seq / 2 per trained token, a third of it per reference token), over
the steps after `--warmup` against `--peak-tflops` per GPU (default: the H100/A100/A800 bf16 dense peak when the
GPU's name says so; on CPU MFU is shown only when given).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from mdpo.config import ModelConfig
from mdpo.planner import MODELS, flops_per_token, matmul_params
from mdpo.planner.runs import run_config

# Llama 2 shapes (vocab 32000) and TinyLlama's 1.1B shape (mdpo.planner's presets); "tiny" is for CPU.
TINY = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
PRESETS = {
    "tiny": TINY,
    "1b": MODELS["tinyllama-1.1b"],
    "7b": MODELS["llama2-7b"],
    "13b": MODELS["llama2-13b"],
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0}  # bf16 dense


def flops_per_step(m: ModelConfig, tokens: float, seq_len: int, reference: str) -> float:
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
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (prompt + response)")
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
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device; default from the GPU's name")
    parser.add_argument("--csv", default="benchmarks/results.csv")
    parser.add_argument("extra", nargs="*", help="more mdpo key=value overrides")
    args = parser.parse_args()
    world, model = args.nproc, PRESETS[args.model]
    run = run_config(model, seq_len=args.seq_len, micro_batch=args.micro_batch, steps=args.steps, warmup=args.warmup,
                     nproc=world, tp=args.tp, pp=args.pp, cp=args.cp, reference=args.reference, packing=args.packing,
                     attention=args.attention, global_batch=args.global_batch, prompt_len=args.prompt_len,
                     extra=tuple(args.extra))  # fmt: skip
    step_s, tokens = run["step_s"], run["tokens"]
    reference = "online" if args.reference == "online" else "none"
    achieved = flops_per_step(model, tokens, args.seq_len, reference) / step_s / 1e12
    peak = args.peak_tflops or default_peak()
    mfu = achieved / (peak * world) if peak else None
    row = {"model": args.model, "params_b": round(matmul_params(model) / 1e9, 3), "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "global_batch": run["global_batch"], "tp": args.tp, "pp": args.pp,
           "cp": args.cp, "world": world, "attention": args.attention, "reference": args.reference,
           "packing": args.packing, "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1),
           "tokens_per_s_per_device": round(tokens / step_s / world, 1),
           "peak_memory_gib": round(run["peak_memory_gib"], 2), "tflops_per_device": round(achieved / world, 2),
           "mfu": round(mfu, 4) if mfu is not None else ""}  # fmt: skip
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
