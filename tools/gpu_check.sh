#!/usr/bin/env bash
# Everything a lent GPU needs, in one call of under 5 minutes (the GPU machine has no internet, no megatron-core,
# no datasets). Before the call, on this machine, fetch Python 3.12 wheels into the ignored folder gpu-wheels/:
#   for v in 0.16.1 0.19.0; do pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d gpu-wheels megatron-core==$v; done
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d gpu-wheels datasets dill multiprocess pyarrow
#   pip download --no-deps --only-binary=:all: -d gpu-wheels pytest-xdist execnet
# and pass `carry: ["gpu-wheels"]` to the device call (pyarrow is installed only if the machine's is too old).
# Benchmarks first, alone on the card: the card's bf16 matmul peak, then DPO at tulu-2-13b's shape (hidden 5120,
# 40 heads, MLP 13824, vocab 32000; LAYERS_13B of its 40 layers, default 10) on the real UltraFeedback lengths,
# packed (the recipe's 16,384-token packs), bf16, SDPA, with a precomputed reference (no reference forward)
# unfused, with the fused SwiGLU, with the fused RoPE, and with the online reference and both fusions. Then the GPU
# tests under both megatron-core versions (CI's 0.16.1 and 0.19) at once, four pytest workers each. Prints a table
# with MFU last. `bash tools/gpu_check.sh 1b`: the 1.1B Llama rows instead (synthetic equal-length and real pairs),
# `planner`: `mdpo plan`'s memory and time predictions against 1.1B runs. Benchmarks run on megatron-core 0.19 when
# its wheel is there (MCORE=0.16.1 to choose). Budget: benchmark rows start only in the first BENCH_S seconds
# (default 170), the tests get what is left of TOTAL_S (default 290), at least 60 s. Logs and the CSV go to $OUT
# when set (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
start=$(date +%s)
mode=${1:-13b}
# site-packages of one megatron-core version: /tmp/mcore-VERSION (on PYTHONPATH before the common /tmp/site)
versions=()
if python3 -c "import megatron.core" 2>/dev/null; then
  versions=(installed)
else
  for wheel in gpu-wheels/megatron_core-*.whl; do
    [ -f "$wheel" ] || continue
    v=$(basename "$wheel" | cut -d- -f2)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/mcore-$v" "$wheel" \
      && versions+=("$v")
  done
  [ ${#versions[@]} -gt 0 ] || { echo "no megatron-core: fetch the wheels named above into gpu-wheels/"; exit 1; }
fi
if ! python3 -c "import datasets, xdist" 2>/dev/null; then
  wheels=(gpu-wheels/datasets-*.whl gpu-wheels/dill-*.whl gpu-wheels/multiprocess-*.whl)
  wheels+=(gpu-wheels/pytest_xdist-*.whl gpu-wheels/execnet-*.whl)
  python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
    || wheels+=(gpu-wheels/pyarrow-*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" \
    || { echo "wheel install failed: fetch the wheels named above into gpu-wheels/"; exit 1; }
fi
export PYTHONUNBUFFERED=1
with_mcore() {  # with_mcore VERSION COMMAND...: the command with that megatron-core first on the path
  local v=$1
  shift
  PYTHONPATH="$PWD${v:+:/tmp/mcore-$v}:/tmp/site" "$@"
}
bench_version=${MCORE:-${versions[-1]}}
[ "$bench_version" = installed ] && bench_version=""
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)
if [ "$mode" = planner ]; then  # `bash tools/gpu_check.sh planner`: the planner against 1.1B runs instead
  echo "$gpu"
  with_mcore "$bench_version" timeout 400 python3 benchmarks/validate_planner.py --gpu --steps 6 \
    --csv "$out/planner_gpu.csv" 2>&1 | tee "$out/planner.log" | grep -v Warning | tail -12
  exit
fi
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
# name|arguments|profile (1: profile the last warm-up step into $out/profile_NAME.txt); rows start only in the
# first BENCH_S seconds. Real UltraFeedback rows need ../shared (or shared/) with the data.
uf=data/ultrafeedback_binarized_sample_200.jsonl
real=0
{ [ -f "../shared/$uf" ] || [ -f "shared/$uf" ]; } && real=1
if [ "$mode" = 13b ]; then
  [ "$real" = 1 ] || { echo "no shared/$uf here or in ../shared: the 13B rows need the real data"; exit 1; }
  warmup=2
  shape=(--model 13b --layers "${LAYERS_13B:-10}" --data real --seq-len 8192 --packing --micro-batch 1
         --global-batch 64 --steps 6 --warmup $warmup)
  configs=(
    "13b_precomputed|--reference none|1"
    "13b_precomputed_fused_swiglu|--reference none --fused-swiglu|0"
    "13b_precomputed_fused_rope|--reference none --fused-rope|0"
    "13b_online_fused|--reference online --fused-swiglu --fused-rope|0"
    "13b_precomputed_fused_selective|--reference none --fused-swiglu --fused-rope parallel.recompute=selective|0"
  )
else
  warmup=3
  shape=(--model 1b --seq-len 2048 --micro-batch 2 --steps 8 --warmup $warmup)
  configs=(
    "padded_online|--reference online|1"
    "padded_noref_mbs4|--reference none --micro-batch 4|0"
    "packed_noref_mbs4|--reference none --packing --micro-batch 4|0"
  )
  # Real lengths (Tulu 2, Llama 2 tokenizer, max_length 2048): shared vs unshared prompts, packed
  [ "$real" = 1 ] && configs+=(
    "real_packed_shared_noref|--data real --reference none --packing --micro-batch 4|1"
    "real_packed_unshared_noref|--data real --reference none --packing --micro-batch 4 --no-share-prompt|0"
    "real_padded_shared_noref|--data real --reference none --micro-batch 4|0"
    "real_packed_shared_fused|--data real --reference none --packing --micro-batch 4 --fused-swiglu --fused-rope|0"
  )
fi
for entry in "${configs[@]}"; do
  IFS='|' read -r name args profile <<< "$entry"
  if (( $(date +%s) - start > ${BENCH_S:-170} )); then echo "skipped (time): $name"; continue; fi
  dir=/tmp/bench_$name
  extra=()
  [ "$profile" = 1 ] && extra=(logging.profile_step=$warmup)
  row_start=$(date +%s)
  echo "== $name" >> "$out/bench.log"
  # shellcheck disable=SC2086
  MDPO_BENCH_DIR=$dir with_mcore "$bench_version" timeout 100 python3 benchmarks/bench_dpo.py "${shape[@]}" \
    --attention sdpa --csv "$csv" $args "${extra[@]}" >> "$out/bench.log" 2>&1 \
    || { echo "FAILED: $name"; tail -15 "$out/bench.log"; }
  echo "$name: $(( $(date +%s) - row_start )) s"
  [ -f "$dir/run/profile.txt" ] && cp "$dir/run/profile.txt" "$out/profile_$name.txt"
done
# The GPU tests, each megatron-core version in its own pytest (four workers when xdist is there), both at once
left=$(( ${TOTAL_S:-290} - ($(date +%s) - start) ))
(( left < 60 )) && left=60
workers=()
PYTHONPATH=/tmp/site python3 -c "import xdist" 2>/dev/null && workers=(-n 4)
pids=()
for v in "${versions[@]}"; do
  [ "$v" = installed ] && v=""
  log="$out/gpu_tests${v:+_$v}.log"
  with_mcore "$v" python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', \
    m.__version__)" > "$log" 2>&1
  with_mcore "$v" timeout "$left" python3 -m pytest -q -p no:cacheprovider -o addopts="" "${workers[@]}" \
    tests/test_gpu.py >> "$log" 2>&1 &
  pids+=("$!")
done
tests=()  # "VERSION|exit code|passed/failed line" per megatron-core version
for i in "${!versions[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  v=${versions[$i]}
  [ "$v" = installed ] && log="$out/gpu_tests.log" || log="$out/gpu_tests_$v.log"
  tail -8 "$log"
  tests+=("$v|$rc|$(grep -E '(passed|failed|error)' "$log" | tail -1)")
done
echo
echo "| $gpu | |"
echo "|---|---|"
for t in "${tests[@]}"; do
  IFS='|' read -r v rc summary <<< "$t"
  echo "| GPU tests, megatron-core $v: exit code $rc | $summary |"
done
echo "| bf16 8192^3 matmul (TFLOP/s) | $matmul |"
python3 - "$csv" <<'PY'
import csv, os, sys
rows = list(csv.DictReader(open(sys.argv[1]))) if os.path.exists(sys.argv[1]) else []
print("\n| model (layers, params) | reference | fused SwiGLU / RoPE | data (mean seq) | max length "
      "| mbs / pairs per step | step s | tokens/s (TRL count) | computed tokens/s | peak GiB | TFLOP/s "
      "| MFU (computed tokens) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    layout = ", packed" if r["packing"] == "True" else ""
    layout += ", shared prompt" if r["share_prompt"] == "True" else ", unshared"
    mfu = f"{100 * float(r['mfu']):.1f}%" if r["mfu"] else "n/a"
    print(f"| {r['model']} ({r['layers']} layers, {r['params_b']}B) | {r['reference']}{layout} "
          f"| {r['fused_swiglu']} / {r['fused_rope']} "
          f"| {r['data']} ({r['mean_sequence']}) | {r['seq_len']} | {r['micro_batch']} / {r['global_batch']} "
          f"| {r['step_s']} | {r['tokens_per_s']} | {r['computed_tokens_per_s']} | {r['peak_memory_gib']} "
          f"| {r['tflops_per_device']} | {mfu} |")
PY
echo "| total seconds | $(( $(date +%s) - start )) |"
