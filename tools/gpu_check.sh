#!/usr/bin/env bash
# Everything a lent GPU needs, in one call of under 5 minutes (the GPU machine has no internet, no megatron-core,
# no datasets). Before the call, on this machine, fetch Python 3.12 wheels into the ignored folder gpu-wheels/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d gpu-wheels megatron-core==0.16.1 datasets dill multiprocess pyarrow
# and pass `carry: ["gpu-wheels"]` to the device call (pyarrow is installed only if the machine's is too old).
# Runs the GPU tests, measures the card's bf16 matmul peak, then benchmarks DPO on a 1.1B Llama (bf16, SDPA flash
# attention; packed rows and shared-prompt blocks through torch's varlen flash kernel) on synthetic equal-length
# pairs and on real UltraFeedback lengths, and prints a table with MFU last. With the argument
# `planner` it checks `mdpo plan`'s memory and time predictions against 1.1B runs instead. Logs and the CSV
# go to $OUT when set (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
start=$(date +%s)
if ! python3 -c "import datasets, megatron.core" 2>/dev/null; then
  wheels=(gpu-wheels/megatron_core-*.whl gpu-wheels/datasets-*.whl gpu-wheels/dill-*.whl gpu-wheels/multiprocess-*.whl)
  python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
    || wheels+=(gpu-wheels/pyarrow-*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" \
    || { echo "wheel install failed: fetch the wheels named above into gpu-wheels/"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)
if [ "${1:-}" = planner ]; then  # `bash tools/gpu_check.sh planner`: the planner against 1.1B runs instead
  echo "$gpu"
  timeout 400 python3 benchmarks/validate_planner.py --gpu --steps 6 --csv "$out/planner_gpu.csv" 2>&1 \
    | tee "$out/planner.log" | grep -v Warning | tail -12
  exit
fi
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
matmul=$(python3 - <<'PY'
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
csv="$out/gpu_bench.csv"
rm -f "$csv" "$out/bench.log"
# name|arguments|profile (1: profile step 3, a warm-up step, into $out/profile_NAME.txt); later rows are skipped
# once the script has run 250 s
configs=(
  "padded_online|--reference online|1"
  "padded_noref_mbs4|--reference none --micro-batch 4|0"
  "packed_noref_mbs4|--reference none --packing --micro-batch 4|0"
)
# Real UltraFeedback lengths (Tulu 2, Llama 2 tokenizer, max_length 2048): shared vs unshared prompts, packed, MFU on
# the tokens computed. Needs ../shared (or shared/) with the data; skipped with a line where it is missing.
uf=data/ultrafeedback_binarized_sample_200.jsonl
if [ -f "../shared/$uf" ] || [ -f "shared/$uf" ]; then
  configs+=(
    "real_packed_shared_noref|--data real --reference none --packing --micro-batch 4|1"
    "real_packed_unshared_noref|--data real --reference none --packing --micro-batch 4 --no-share-prompt|0"
    "real_padded_shared_noref|--data real --reference none --micro-batch 4|0"
    "real_packed_shared_online|--data real --reference online --packing --micro-batch 4|0"
  )
else
  echo "real-data rows skipped: no shared/$uf here or in ../shared"
fi
for entry in "${configs[@]}"; do
  IFS='|' read -r name args profile <<< "$entry"
  if (( $(date +%s) - start > 250 )); then echo "skipped (time): $name"; continue; fi
  dir=/tmp/bench_$name
  extra=()
  [ "$profile" = 1 ] && extra=(logging.profile_step=3)
  echo "== $name" >> "$out/bench.log"
  # shellcheck disable=SC2086
  MDPO_BENCH_DIR=$dir timeout 120 python3 benchmarks/bench_dpo.py --model 1b --seq-len 2048 --micro-batch 2 \
    --steps 8 --warmup 3 --attention sdpa --csv "$csv" $args "${extra[@]}" >> "$out/bench.log" 2>&1 \
    || { echo "FAILED: $name"; tail -15 "$out/bench.log"; }
  [ -f "$dir/run/profile.txt" ] && cp "$dir/run/profile.txt" "$out/profile_$name.txt"
done
echo
echo "| $gpu | |"
echo "|---|---|"
echo "| GPU tests exit code | $tests_rc |"
echo "| bf16 8192^3 matmul (TFLOP/s) | $matmul |"
python3 - "$csv" <<'PY'
import csv, os, sys
rows = list(csv.DictReader(open(sys.argv[1]))) if os.path.exists(sys.argv[1]) else []
print("\n| 1.1B Llama, max 2048 per sequence | data (mean seq) | mbs | step s | tokens/s (TRL count) "
      "| computed tokens/s | peak GiB | TFLOP/s | MFU (of 989, computed tokens) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    name = f"reference={r['reference']}" + (", packed" if r["packing"] == "True" else "")
    name += ", shared prompt" if r["share_prompt"] == "True" else ", unshared"
    mfu = f"{100 * float(r['mfu']):.1f}%" if r["mfu"] else "n/a"
    print(f"| {name} | {r['data']} ({r['mean_sequence']}) | {r['micro_batch']} | {r['step_s']} | {r['tokens_per_s']} "
          f"| {r['computed_tokens_per_s']} | {r['peak_memory_gib']} | {r['tflops_per_device']} | {mfu} |")
PY
echo "| total seconds | $(( $(date +%s) - start )) |"
