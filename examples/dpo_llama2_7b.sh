#!/usr/bin/env bash
# DPO of Llama 2 7B (LlamaForCausalLM) on UltraFeedback-binarized, one node x 8 GPUs (80 GB).
#   NNODES=1 HF_MODEL=/models/llama-2-7b DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_llama2_7b.sh
# Layout: 7B at TP=2 (state 7e9 x (2 + 4) / 2 + 7e9 x 12 / 8 = 31.5 GB on one 8-GPU node; packs of 8192 tokens with SP ~14 GB of activations).
# Distributed optimizer over DP, precomputed reference, packing; see examples/dpo_tulu2_13b.sh for the reasoning.
# Sequence parallel needs Transformer Engine's layers (NGC PyTorch containers have TE); without TE pass
# parallel.sequence_parallel=false parallel.recompute=selective, or a larger TP.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local llama-2-7b HF folder}
DATA=${DATA:?set DATA to the preference data files}
WORK=${WORK:-runs/llama2_7b_dpo}
LR=$(python -c "import math; print(1e-6 * math.sqrt($NNODES))")
if [ "$NODE_RANK" = 0 ] && [ ! -f "$WORK/mcore/mdpo_model.json" ]; then
  mdpo convert hf-to-megatron --hf "$HF_MODEL" --out "$WORK/mcore" --tp 2
fi
until [ -f "$WORK/mcore/mdpo_model.json" ]; do sleep 10; done
LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m mdpo)
ARGS=(
  model.init_from="$WORK/mcore" data.tokenizer="$WORK/mcore" data.train_file="$DATA"
  data.template=tulu2 data.max_length=4096 data.packing=true data.pack_tokens=8192
  parallel.tp=2 parallel.sequence_parallel=true parallel.distributed_optimizer=true
  parallel.overlap_grad_reduce=true parallel.overlap_param_gather=true
  schedule.global_batch_size=$((128 * NNODES)) schedule.epochs=3 schedule.warmup_ratio=0.1
  optimizer.lr="$LR" optimizer.weight_decay=0.0 dpo.beta=0.1
  dpo.reference=precomputed dpo.reference_cache="$WORK/reference"
  logging.run_dir="$WORK" checkpoint.save_interval=100 checkpoint.export_hf=true
)
[ -f "$WORK/reference/train.safetensors" ] || "${LAUNCH[@]}" precompute-ref "${ARGS[@]}"
"${LAUNCH[@]}" train "${ARGS[@]}" "$@"
