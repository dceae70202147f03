#!/usr/bin/env bash
# Tulu 3's DPO step as published (allenai/open-instruct, Llama-3.1-Tulu-3-8B-SFT -> Llama-3.1-Tulu-3-8B-DPO):
# length-normalised DPO (dpo.loss_type=sigmoid_norm, TRL's name for open-instruct's dpo_norm), beta 5, lr 5e-7,
# global batch 128, max length 2048, 1 epoch, AdamW, linear schedule with warmup 0.1, weight decay 0, the Tulu 3 chat
# format (data.template=tulu3: <|user|> / <|assistant|> turns ending in the tokenizer's EOS, BOS first), on one node of
# 8 GPUs (the steps are in examples/_dpo_recipe.sh):
#
#   HF_MODEL=/models/Llama-3.1-Tulu-3-8B-SFT DATA=/data/llama-3.1-tulu-3-8b-preference-mixture \
#   bash examples/dpo_tulu3_8b.sh
#
# Layout, from `mdpo plan --model tulu3-8b --gpu h100-80g --nodes 1 --gpus-per-node 8 --pairs 272898
# --max-tokens 4096 --epochs 1 --reference precomputed --global-batch 128` (mdpo 0.1, 2026-12-06; a prediction, not
# measured: 1,010 tokens per pair is the planner's UltraFeedback default, not the Tulu 3 mixture's own lengths):
#   TP=2 inside the node with sequence parallelism, DP=4, packs of 2 x 2048 tokens, the reference precomputed:
#   48.2 GiB per GPU (33.7 of weights, fp32 gradients and the distributed optimizer's state, 13.5 of activations,
#   1.0 of logits at the 128,256-entry vocabulary), 1.90 s a step, 1.46 h for the epoch. TP=1 x PP=2 x VPP=4 ranks
#   equal (1.89 s) at 64 GiB but adds a pipeline; TP=1 x DP=8 would be 1.83 s but needs 85.1 GiB (56.1 of weights,
#   gradients and optimizer state): it does not fit an 80 GB card. TP=2 keeps each GEMM's all-reduce inside NVLink
#   pairs and needs no recompute.
# Llama 3.1's rope_scaling (llama3, factor 8) and its 128,256-entry vocabulary come from the model's config.json.
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local Llama-3.1-Tulu-3-8B-SFT HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. the Tulu 3 8B preference mixture)}
WORK=${WORK:-runs/tulu3_8b_dpo}
TP=${TP:-2}
MAX_LENGTH=${MAX_LENGTH:-2048}
TEMPLATE=${TEMPLATE:-tulu3}
BASE_LR=5e-7
GLOBAL_BATCH=128
RECIPE_ARGS=(parallel.sequence_parallel=$([ "$TP" -gt 1 ] && echo true || echo false) schedule.epochs=1
             dpo.loss_type=sigmoid_norm dpo.beta=5.0)
source "$(dirname "$0")/_dpo_recipe.sh"
