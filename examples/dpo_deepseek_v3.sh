#!/usr/bin/env bash
# DPO of DeepSeek-V3 / V3.1 / R1 (61 layers, multi-latent attention, 3 dense layers then 256 routed experts, top 8
# within 4 of 8 groups, and a shared expert; 671.03B parameters, 37.55B active per token) on UltraFeedback with the
# reference workload's settings (beta 0.1, global batch 128 x nodes, AdamW, linear schedule, warmup 0.1, 3 epochs),
# the model's own chat template and DeepSeek-V3's sequence-wise balancing loss (Megatron's `seq`, weight 1e-4, as its
# paper; logged as aux_loss), full tuning (the default: lr 1e-6 x sqrt(nodes)) or LoRA (LORA=1: rank 64,
# alpha 128, dropout 0.05 on attention, MLA's down and up projections and output, experts untouched; lr 5e-6 x
# sqrt(nodes)). The steps are in examples/_dpo_recipe.sh; the multi-token prediction layer (layers.61) is carried
# untrained into the export. HF_MODEL is the release as published (its FP8 block-scaled weights are dequantized as
# they are read; the export is bf16) or a bf16 folder. Run the same command on every node (a shared filesystem holds
# WORK):
#
#   NNODES=32 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#   HF_MODEL=/models/DeepSeek-V3-bf16 DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_deepseek_v3.sh
#   LORA=1 NNODES=4 NODE_RANK=0 ... bash examples/dpo_deepseek_v3.sh
#
# Layouts, from `mdpo plan --model deepseek-v3-671b --gpu h100-80g --gpus-per-node 8 --reference precomputed
# --max-tokens 4096` (mdpo 0.1, 2026-12-07; predictions, not measured: balanced routing and 1,010 tokens per pair
# assumed), each at --global-batch 128 x nodes:
# - Full tuning, --nodes 32: TP=4 with sequence parallelism (Megatron's MoE layers need it under TP), EP=256 with
#   one expert whole per rank (ETP=1; the all-to-all crosses nodes), DP=64, PP=1, full recompute, packs of
#   2 x 2048 tokens, the reference precomputed: 69.5 GiB per GPU (67.9 of bf16 weights, fp32 gradients and the
#   distributed optimizer's state; 0.9 of activations, 0.7 of logits), 34.7 s a step, 0.45 h for the 3 epochs
#   (packs of 8192 rank 0.1% faster at 71.0 GiB). 16 nodes fit no layout; 64 nodes take TP=8 x EP=256 without
#   recompute (62.4 GiB, 25.1 s a step, 0.17 h).
# - LoRA, --nodes 4 --lora-rank 64: TP=8 with sequence parallelism, EP=32 (ETP=1), DP=4, PP=1, no recompute, packs of
#   2 x 2048 tokens: 64.4 GiB per GPU (43.4 of frozen bf16 weights and the adapters' state, 20.7 of activations,
#   0.3 of logits), 21.6 s a step, 2.24 h. 2 nodes fit no layout (the bf16 base alone is 84 GB per GPU over 16);
#   8 nodes take TP=4 x EP=64 (68.3 GiB, 20.9 s, 1.09 h).
# PP=1 keeps one stage (the planner ranks no pipeline above these; it models neither routing imbalance nor a stage's
# MoE load). The first pass converts in one process holding about one HF shard.
LORA=${LORA:-0}
source "$(dirname "$0")/_tuning_mode.sh" LORA "$LORA"  # BASE_LR and MODE_ARGS
if [ "$LORA" = 1 ]; then
  NNODES=${NNODES:-4} TP=${TP:-8} EP=${EP:-32}
  LAYOUT_ARGS=("lora.targets=[qkv, proj]")  # experts take no adapters (docs/lora.md)
else
  NNODES=${NNODES:-32} TP=${TP:-4} EP=${EP:-256}
  LAYOUT_ARGS=(parallel.recompute=full)
fi
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local bf16 DeepSeek-V3 HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/deepseek_v3_$([ "$LORA" = 1 ] && echo lora_)dpo}
MAX_LENGTH=${MAX_LENGTH:-2048}
TEMPLATE=${TEMPLATE:-tokenizer}
# TP > 1: sequence parallelism turns on by itself (MoE)
RECIPE_ARGS=(parallel.ep="$EP" parallel.etp=1 dpo.router_aux_loss_type=seq dpo.router_aux_loss_coef=1e-4
             "${MODE_ARGS[@]}" "${LAYOUT_ARGS[@]}")
source "$(dirname "$0")/_dpo_recipe.sh"
