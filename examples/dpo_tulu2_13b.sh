#!/usr/bin/env bash
# The seed's workload: DPO of tulu-2-13b on UltraFeedback-binarized (61k pairs), Tulu 2 format, beta 0.1,
# lr 1e-6 x sqrt(nodes), global batch 128 x nodes, AdamW, linear schedule, warmup 0.1, weight decay 0, 3 epochs,
# max length 8192, on 2 nodes x 8 A800-80G (the steps are in examples/_dpo_recipe.sh). Run the same command on every node (a shared filesystem holds WORK):
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
# Sequence parallel runs on Transformer Engine's layers (NGC PyTorch containers have TE) and on Megatron-Core's
# local ones (no TE, or model.attention=sdpa: there each pair's prompt is also computed once, data.share_prompt).
NNODES=${NNODES:-2}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local tulu-2-13b HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/tulu2_13b_dpo}
TP=4
MAX_LENGTH=8192
TEMPLATE=tulu2
RECIPE_ARGS=(data.format=ultrafeedback parallel.sequence_parallel=true)
source "$(dirname "$0")/_dpo_recipe.sh"
