#!/usr/bin/env bash
# Everything a lent GPU needs, in one call of a few minutes (the GPU machine has no internet and no megatron-core).
#
# Before the call, on this machine, fetch Python 3.12 wheels into the ignored folder gpu-wheels/:
#   pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps \
#       -d gpu-wheels/ megatron-core==0.16.1
# and pass `carry: ["gpu-wheels"]` to the device call. Prints a table last.
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || pip install --quiet --no-index --find-links gpu-wheels megatron-core
import megatron.core  # noqa: F401
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
python -m pytest -q tests/test_gpu.py 2>&1 | tail -5
tests_rc=${PIPESTATUS[0]}
python - <<'PY'
import json, subprocess, sys, tempfile, time
from pathlib import Path
out = Path(tempfile.mkdtemp())
t = time.time()
r = subprocess.run([sys.executable, "-m", "mdpo", "demo", "--out", str(out)], capture_output=True, text=True)
wall = time.time() - t
recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if r.returncode == 0 else []
train = [x for x in recs if "tokens_per_second" in x]
acc = [x["eval_rewards/accuracies"] for x in recs if "eval_rewards/accuracies" in x]
print("| check | value |\n|---|---|")
print(f"| demo exit code | {r.returncode} |")
print(f"| demo wall time (s) | {wall:.1f} |")
if train:
    print(f"| demo tokens/s (median step) | {sorted(x['tokens_per_second'] for x in train)[len(train) // 2]:.0f} |")
if acc:
    print(f"| demo held-out accuracy before -> after | {acc[0]:.3f} -> {acc[-1]:.3f} |")
if r.returncode:
    print(r.stderr[-2000:])
PY
echo "| GPU tests exit code | $tests_rc |"
echo "| total seconds | $(( $(date +%s) - start )) |"
