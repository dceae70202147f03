#!/usr/bin/env bash
# DPO of GLM-4.5-Air (mixture of experts: 46 layers, the first dense, then 128 experts top 8 beside a shared expert,
# sigmoid routing with the checkpoint's score correction bias, frozen; 96 heads of 128 with q/k/v biases, half of each
# head rotated; 106.85B parameters, 13.42B active per token, its multi-token prediction layer carried untrained into
# the export) on UltraFeedback with the reference workload's settings (beta 0.1, global batch 128 x nodes, AdamW,
# linear schedule, warmup 0.1, 3 epochs) and the model's own chat template; GLM-4.5 has no load-balancing loss
# (transformers' class computes none). Full tuning (lr 1e-6 x sqrt(nodes)) on 4 nodes x 8 GPUs, or LoRA (LORA=1:
# rank 64, alpha 128, dropout 0.05 on the attention's q/k/v and output projections, the experts take none; lr 5e-6 x
# sqrt(nodes)) on 2 nodes. The steps are in examples/_dpo_recipe.sh. Run the same command on every node (a shared
# filesystem holds WORK):
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#   HF_MODEL=/models/GLM-4.5-Air DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_glm45_air.sh
#   LORA=1 NNODES=2 NODE_RANK=0 ... bash examples/dpo_glm45_air.sh
#
# Layouts, from `mdpo plan --model glm-4.5-air-106b --gpu h100-80g --nodes N --gpus-per-node 8 --reference
# precomputed --global-batch 128N --max-tokens 4096` (mdpo 0.1, 2026-12-07; predictions, not measured: balanced
# routing and 1,010 tokens per pair assumed), packs of 2 x 2048 tokens, the reference precomputed:
# - Full tuning, 4 nodes: TP=4 with sequence parallelism (Megatron's MoE layers need it under TP), PP=2, EP=16 with
#   each expert whole on its rank (ETP=1), DP=4, selective recompute: 73.3 GiB per GPU (58.8 of weights, fp32
#   gradients and the distributed optimizer's state; 14.5 of activations), 9.71 s a step, 1.00 h for the 3 epochs.
#   TP=8 x PP=2 x EP=16 fits with less memory (63.5-64.7 GiB) but is 3% slower. 2 nodes fit no layout; 8 nodes
#   (TP=4 x PP=2 x EP=8, DP=8) take 4.18 s a step. With PP > 1 a load-balancing loss, if one is asked for
#   (dpo.router_aux_loss_coef), is Megatron's per layer (docs/mixture-of-experts.md).
# - LoRA (--lora-rank 64), 2 nodes: TP=2 with sequence parallelism, PP=1, EP=8 (ETP=1), DP=8, no recompute: 65.7 GiB
#   per GPU (30.4 of bf16 weights and the adapters' state; 34.1 of activations; 1.2 of logits), 2.52 s a step,
#   0.56 h for the 3 epochs (selective recompute: 60.8 GiB, 1% slower).
# The first pass converts in one process holding about one HF shard; the correction bias is used as loaded, never
# updated (docs/model-families.md).
LORA=${LORA:-0}
source "$(dirname "$0")/_tuning_mode.sh" LORA "$LORA"  # BASE_LR and MODE_ARGS
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local GLM-4.5-Air HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
MAX_LENGTH=${MAX_LENGTH:-2048}
TEMPLATE=${TEMPLATE:-tokenizer}
if [ "$LORA" = 1 ]; then
  NNODES=${NNODES:-2} TP=${TP:-2} PP=${PP:-1} EP=${EP:-8}
  WORK=${WORK:-runs/glm45_air_lora_dpo}
  LAYOUT_ARGS=("lora.targets=[qkv, proj]")  # experts take no adapters (docs/lora.md)
else
  NNODES=${NNODES:-4} TP=${TP:-4} PP=${PP:-2} EP=${EP:-16}
  WORK=${WORK:-runs/glm45_air_dpo}
  LAYOUT_ARGS=(parallel.recompute=selective)
fi
# TP > 1: sequence parallelism turns on by itself (MoE)
RECIPE_ARGS=(parallel.ep="$EP" parallel.etp=1 "${MODE_ARGS[@]}" "${LAYOUT_ARGS[@]}")
source "$(dirname "$0")/_dpo_recipe.sh"
