#!/usr/bin/env bash
# The seed's workload: DPO of tulu-2-13b on UltraFeedback-binarized (61k pairs), Tulu 2 format, beta 0.1,
# lr 1e-6 x sqrt(nodes), global batch 128 x nodes, AdamW, linear schedule, warmup 0.1, weight decay 0, 3 epochs,
# max length 8192, on 2 nodes x 8 A800-80G. Run the same command on every node (a shared filesystem holds WORK):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#   HF_MODEL=/models/tulu-2-13b DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_tulu2_13b.sh
#
# Layout for 80 GB cards (13B, bf16 weights, fp32 gradients, distributed AdamW states over DP):
#   TP=4 inside a node (NVLink), PP=1, DP=4 over 16 GPUs, sequence parallel. Per GPU: weights 13e9 x 2 B / 4 = 6.5
#   GB, fp32 grads 13 GB, optimizer (fp32 master + 2 moments, 12 B/param) over 16 ranks 9.8 GB: ~29 GB of state.
#   Activations of one 16,384-token pack (2 x max_length, whole pairs, packing ~97% efficient on UltraFeedback
#   where padding to the longest wastes 15-50%): with sequence parallel and flash attention ~34 B x tokens x hidden
#   / TP per layer = 0.7 GB x 40 layers = 28.5 GB, plus vocab-parallel logits ~1 GB: ~60 GB of 80. Without SP
#   the LayerNorm/residual activations are not split (~54 GB) and it does not fit; TP=8 would fit without SP but
#   puts every GEMM's all-reduce on all 8 GPUs. PP is not needed at 13B and would add pipeline bubbles.
#   The reference is precomputed once (one forward over the data, same layout), so training holds no reference
#   model and runs 3 passes (fwd + bwd) instead of 4 per step. Micro-batch = one pack; 128 x nodes pairs per step
#   are ~8 packs per DP rank, enough to overlap the gradient reduce-scatter and parameter all-gather.
# Sequence parallel needs Transformer Engine's layers (NGC PyTorch containers have TE); without TE pass
# parallel.sequence_parallel=false parallel.recompute=selective, or a larger TP.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local tulu-2-13b HF folder}
DATA=${DATA:?set DATA to the UltraFeedback-binarized train_prefs files (parquet/jsonl or a folder of shards)}
WORK=${WORK:-runs/tulu2_13b_dpo}
LR=$(python -c "import math; print(1e-6 * math.sqrt($NNODES))")
GBS=$((128 * NNODES))

# 1. HF -> Megatron once (node 0), written at the training layout; the other nodes wait for it.
if [ "$NODE_RANK" = 0 ] && [ ! -f "$WORK/mcore/mdpo_model.json" ]; then
  mdpo convert hf-to-megatron --hf "$HF_MODEL" --out "$WORK/mcore" --tp 4
fi
until [ -f "$WORK/mcore/mdpo_model.json" ]; do sleep 10; done

LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m mdpo)
ARGS=(
  model.init_from="$WORK/mcore" data.tokenizer="$WORK/mcore" data.train_file="$DATA"
  data.format=ultrafeedback data.template=tulu2 data.max_length=8192 data.packing=true data.pack_tokens=16384
  parallel.tp=4 parallel.pp=1 parallel.sequence_parallel=true parallel.distributed_optimizer=true
  parallel.overlap_grad_reduce=true parallel.overlap_param_gather=true
  schedule.global_batch_size="$GBS" schedule.epochs=3 schedule.warmup_ratio=0.1
  optimizer.lr="$LR" optimizer.weight_decay=0.0 optimizer.clip_grad=1.0
  dpo.beta=0.1 dpo.loss_type=sigmoid dpo.reference=precomputed dpo.reference_cache="$WORK/reference"
  logging.run_dir="$WORK" checkpoint.save_interval=100 checkpoint.export_hf=true
)
# 2. The reference log-probs, once (skipped by the cache check when already there and current).
[ -f "$WORK/reference/train.safetensors" ] || "${LAUNCH[@]}" precompute-ref "${ARGS[@]}"
# 3. DPO; rerunning the same command resumes from the last checkpoint. The policy is exported to $WORK/hf.
"${LAUNCH[@]}" train "${ARGS[@]}" "$@"
