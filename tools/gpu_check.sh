#!/usr/bin/env bash
# Everything a lent GPU needs, in one call of under 5 minutes (the GPU machine has no internet and no megatron-core).
#
# Before the call, on this machine, fetch Python 3.12 wheels into the ignored folder gpu-wheels/:
#   pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps \
#       -d gpu-wheels/ megatron-core==0.16.1
#   pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: -d gpu-wheels/ datasets
# and pass `carry: ["gpu-wheels"]` to the device call. Runs the GPU tests, measures the card's bf16 matmul peak,
# then benchmarks DPO on a ~1B Llama (SDPA attention, bf16) and prints a table with MFU last.
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || pip install --quiet --no-index --find-links gpu-wheels megatron-core datasets
import datasets, megatron.core  # noqa: F401
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout 120 python -m pytest -q tests/test_gpu.py 2>&1 | tail -5
tests_rc=${PIPESTATUS[0]}
matmul=$(python - <<'PY'
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    a @ a
torch.cuda.synchronize()
print(f"{20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f}")
PY
)
rm -f /tmp/gpu_bench.csv
for args in "--reference online" "--reference none" "--reference none --packing"; do
  timeout 150 python benchmarks/bench_dpo.py --model 1b --seq-len 2048 --micro-batch 2 --steps 6 --attention sdpa \
    --csv /tmp/gpu_bench.csv $args > /tmp/gpu_bench_last.txt 2>&1 || tail -20 /tmp/gpu_bench_last.txt
done
echo "| GPU tests exit code | $tests_rc |"
echo "| bf16 8192^3 matmul (TFLOP/s) | $matmul |"
python - <<'PY'
import csv
rows = list(csv.DictReader(open("/tmp/gpu_bench.csv"))) if __import__("os").path.exists("/tmp/gpu_bench.csv") else []
print("| 1.1B Llama, seq 2048, mbs 2 | step s | tokens/s | peak GiB | TFLOP/s | MFU (of 989) |\n|---|---|---|---|---|---|")
for r in rows:
    name = f"reference={r['reference']}" + (", packed" if r["packing"] == "True" else "")
    mfu = f"{100 * float(r['mfu']):.1f}%" if r["mfu"] else "n/a"
    print(f"| {name} | {r['step_s']} | {r['tokens_per_s']} | {r['peak_memory_gib']} | {r['tflops_per_device']} | {mfu} |")
PY
echo "| total seconds | $(( $(date +%s) - start )) |"
