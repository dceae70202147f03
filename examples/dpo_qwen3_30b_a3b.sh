#!/usr/bin/env bash
# DPO of Qwen3-30B-A3B (mixture of experts: 48 layers of 128 experts, top 8; 30.5B parameters, 3.35B active per
# token) on UltraFeedback with the reference workload's settings (beta 0.1, lr 1e-6 x sqrt(nodes), global batch
# 128 x nodes, AdamW, linear schedule, warmup 0.1, 3 epochs), the model's own chat template and its load-balancing
# loss (router_aux_loss_coef 0.001 from config.json, added per pair as TRL's DPOTrainer adds it; logged as aux_loss),
# on 2 nodes x 8 GPUs (the steps are in examples/_dpo_recipe.sh). Run the same command on every node (a shared
# filesystem holds WORK):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#   HF_MODEL=/models/Qwen3-30B-A3B DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_qwen3_30b_a3b.sh
#
# Layout, from `mdpo plan --model qwen3-30b-a3b --gpu a800-80g --nodes 2 --gpus-per-node 8 --reference precomputed
# --global-batch 256 --max-tokens 4096` (mdpo 0.1, 2026-12-07; a prediction, not measured: balanced routing and
# 1,010 tokens per pair assumed): TP=2 with sequence parallelism (Megatron's MoE layers need it under TP), EP=8 with
# each expert whole on its rank (ETP=1; EP within a node: the all-to-all stays on NVLink), DP=8, PP=1, packs of
# 2 x 2048 tokens, the reference precomputed: 62.2 GiB per GPU (45.9 of weights, fp32 gradients and the distributed
# optimizer's state, the experts' optimizer state sharded over the 2 copies EP=8 leaves of each expert; 15.4 of
# activations, 0.9 of logits), 3.06 s a step, 0.66 h for the 3 epochs. TP=4 x EP=8 fits too (59.7 GiB) but is 7%
# slower. Pipelines rank faster on paper (TP=2 x PP=8 x VPP=2 without EP: 2.72 s, 66.3 GiB; the planner models
# neither routing imbalance nor a stage's MoE load); the recipe keeps PP=1, where the load-balancing loss is
# transformers' own per pair as TRL adds it (with PP > 1 mdpo takes Megatron's per-layer loss:
# docs/mixture-of-experts.md). The first pass converts in one process holding about one HF shard.
NNODES=${NNODES:-2}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local Qwen3-30B-A3B HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/qwen3_30b_a3b_dpo}
TP=${TP:-2}
EP=${EP:-8}
MAX_LENGTH=${MAX_LENGTH:-2048}
TEMPLATE=${TEMPLATE:-tokenizer}
RECIPE_ARGS=(parallel.ep="$EP" parallel.etp=1)  # TP > 1: sequence parallelism turns on by itself (MoE)
source "$(dirname "$0")/_dpo_recipe.sh"
