#!/usr/bin/env bash
# DPO of a tiny random Llama on HH-RLHF pairs, tensor parallel over 2 CPU processes (gloo).
# Usage: bash examples/dpo_tiny_cpu.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m mdpo train examples/tiny_hh.yaml \
  --tensor-model-parallel-size 2 "$@"
