"""The planner's predictions against measurements on this machine: peak memory and step time of small models over
several layouts, trained for real by `mdpo train` (the configurations and the fit are mdpo.planner.validation's).

    python benchmarks/validate_planner.py          # this CPU -> benchmarks/results/planner_cpu.csv
    python benchmarks/validate_planner.py --only base dp2 moe moe_ep2 --csv benchmarks/results/planner_cpu_moe.csv
                                                   # a mixture of experts, at EP=1 and EP=2 (docs/planner.md)
    python benchmarks/validate_planner.py --gpu    # one GPU, a 1.1B model (tools/gpu_check.sh planner)
    python benchmarks/validate_planner.py --gpu --measured benchmarks/results/planner_gpu_h100_2026-11-26.csv \
        --preset h100-80g                          # today's planner against an earlier run's measurements

Memory: on CPU the trainer reports each process's peak RSS; the process floor (Python, torch, Megatron, the
data) is measured by the same run with a negligible model (its own small prediction added back) and subtracted,
and glibc is told to map every large block (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS. Time:
a second run of each configuration without that setting (fresh pages for every tensor cost a third more time);
one process = one "GPU" of one thread; the planner's efficiency is the one constant calibrated for the machine
(the geometric-mean fit over all the configurations); gloo's bandwidth and latency are the interconnect and a
single-threaded copy's bandwidth the memory's, both measured here. On a GPU one run gives both (CUDA's
allocator counts exactly), and the preset's memory bandwidth is used.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mdpo import planner
from mdpo.planner.validation import (
    CONFIGS,
    CPU_NORM_SAVES,
    GPU_CONFIGS,
    MEMORY_ENV,
    TIME_ENV,
    calibrate,
    compare,
    floor_gib,
    measure,
    predict,
)

GLOO_BANDWIDTH = """
import time, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(2**20)  # 4 MiB, about one TP all-reduce of these configs
for _ in range(3):
    dist.all_reduce(x)
start = time.perf_counter()
for _ in range(20):
    dist.all_reduce(x)
bandwidth = 2 * (2 - 1) / 2 * x.numel() * 4 * 20 / (time.perf_counter() - start) / 1e9  # bus bandwidth
tiny = torch.ones(1)
start = time.perf_counter()
for _ in range(200):
    dist.all_reduce(tiny)
if dist.get_rank() == 0:
    print(bandwidth, (time.perf_counter() - start) / 200 * 1e6)
dist.destroy_process_group()
"""


def gloo_link() -> tuple[float, float]:
    """All-reduce bus bandwidth (GB/s) and latency (us) between two processes here: the planner's interconnect."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "gloo_bandwidth.py"
        script.write_text(GLOO_BANDWIDTH)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **TIME_ENV}, check=True)
    bandwidth, latency = map(float, result.stdout.split()[-2:])
    return bandwidth, latency


def copy_bandwidth() -> float:
    """GB/s one thread moves copying 512 MiB (read + write): the "GPU" memory bandwidth of a CPU process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source, target = torch.ones(2**27), torch.empty(2**27)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    seconds = (time.perf_counter() - start) / 5
    torch.set_num_threads(threads)
    return 2 * source.numel() * 4 / seconds / 1e9


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def adamw_bytes_per_param(gpu: planner.GPU, params: int = 2**30) -> float:
    """torch's foreach AdamW step on `params` fp32 weights, timed, as bytes per weight at the preset's memory
    bandwidth: the part of the planner's OPTIMIZER_BYTES_PER_PARAM (72 of them) that is torch's."""
    weights = [torch.zeros(2**26, device="cuda", requires_grad=True) for _ in range(params // 2**26)]
    for w in weights:
        w.grad = torch.ones_like(w)
    optimizer = torch.optim.AdamW(weights, lr=1e-6, weight_decay=0.0, foreach=True)
    for _ in range(2):
        optimizer.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        optimizer.step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    return seconds * gpu.memory_gbs * 1e9 / params


def stored(path: str) -> dict[str, dict]:
    """An earlier run's measurements (its CSV), to check a changed planner against without measuring again."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["config"]: {"step_s": float(r["measured_s"]), "peak_memory_gib": float(r["measured_gib"])} for r in rows}


def validate_gpu(args: argparse.Namespace) -> None:
    """One GPU: CUDA's peak allocated bytes since training started (no floor) and step times, bf16."""
    if args.measured:
        name, gpu, measured = args.preset, planner.GPUS[args.preset], stored(args.measured)
    else:
        name = torch.cuda.get_device_name()
        gpu = planner.GPUS["h200-141g" if "H200" in name else "h100-80g"]
        measured = {}
        for key in args.only or GPU_CONFIGS:
            measured[key] = measure(*GPU_CONFIGS[key], steps=args.steps, env={})  # CUDA's peak counts exactly
            print(key, measured[key], flush=True)
    cluster = calibrate(GPU_CONFIGS, measured, planner.Cluster(gpu, nodes=1, gpus_per_node=1, efficiency=1.0))
    rows = [compare(k, predict(*GPU_CONFIGS[k], cluster), got, got["peak_memory_gib"]) for k, got in measured.items()]
    for row in rows:
        print(row, flush=True)
    print(f"{name}: efficiency {cluster.efficiency:.3f}")
    if not args.measured:
        print(
            f"torch AdamW moves {adamw_bytes_per_param(gpu):.0f} bytes per weight at {gpu.memory_gbs:g} GB/s "
            "(planner: 72)"
        )
    write_csv(rows, Path(args.csv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=None, help="default benchmarks/results/planner_{cpu,gpu}.csv")
    parser.add_argument("--steps", type=int, default=6, help="of which the first 2 are not timed")
    parser.add_argument("--only", nargs="*", default=None, help="configuration names (default: all)")
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16, the 1.1B configurations")
    parser.add_argument("--measured", help="take the measurements from this earlier CSV instead of running")
    parser.add_argument("--preset", choices=planner.GPUS, default="h100-80g", help="the GPU of --gpu --measured")
    args = parser.parse_args()
    args.csv = args.csv or f"benchmarks/results/planner_{'gpu' if args.gpu else 'cpu'}.csv"
    if args.gpu:
        return validate_gpu(args)
    bandwidth, latency = gloo_link()
    memory_gbs = copy_bandwidth()
    # peak: a unit the efficiency scales
    cpu = planner.GPU(memory_gib=24, peak_tflops=1.0, intra_node_gbs=bandwidth, memory_gbs=memory_gbs)
    cluster = planner.Cluster(
        cpu, nodes=1, gpus_per_node=1, efficiency=1.0, norm_saves=CPU_NORM_SAVES, collective_latency_us=latency
    )
    if args.measured:  # the stored memory is already over the floor
        timed = stored(args.measured)
        memory = {name: got["peak_memory_gib"] for name, got in timed.items()}
    else:
        timed = {name: measure(*CONFIGS[name], steps=args.steps, env=TIME_ENV) for name in args.only or CONFIGS}
        floors, memory = {}, {}
        for name in timed:
            _, seq, mbs, *_, reference = CONFIGS[name]
            if (seq, mbs, reference) not in floors:
                floors[seq, mbs, reference] = floor_gib(seq, mbs, reference, cluster)
            peak = measure(*CONFIGS[name], steps=3, env=MEMORY_ENV)["peak_memory_gib"]
            memory[name] = peak - floors[seq, mbs, reference]
        print("floors", ", ".join(f"{f:.3f}" for f in floors.values()), "GiB")
    cluster = calibrate(CONFIGS, timed, cluster)
    rows = [compare(name, predict(*CONFIGS[name], cluster), got, memory[name]) for name, got in timed.items()]
    for row in rows:
        print(row, flush=True)
    print(
        f"gloo {bandwidth:.2f} GB/s and {latency:.0f} us, copy {memory_gbs:.1f} GB/s, "
        f"efficiency {cluster.efficiency:.4f} of 1 TFLOP/s"
    )
    write_csv(rows, Path(args.csv))


if __name__ == "__main__":
    main()
