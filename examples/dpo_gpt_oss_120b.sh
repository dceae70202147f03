#!/usr/bin/env bash
# DPO of gpt-oss-120b (mixture of experts: 36 layers of 128 experts with biases, top 4; attention sinks, a window of
# 128 on every other layer; 116.8B parameters, 5.71B active per token) on UltraFeedback with the reference workload's
# settings (beta 0.1, lr 1e-6 x sqrt(nodes), global batch 128 x nodes, AdamW, linear schedule, warmup 0.1, 3 epochs),
# the model's own chat template (harmony) and its config.json's load-balancing loss (router_aux_loss_coef 0.9, logged
# as aux_loss), on 4 nodes x 8 GPUs (the steps are in examples/_dpo_recipe.sh). The released MXFP4 experts are
# dequantized to bf16 by the conversion (exact, as transformers does it); the export is bf16. Run the same command on
# every node (a shared filesystem holds WORK):
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#   HF_MODEL=/models/gpt-oss-120b DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_gpt_oss_120b.sh
#
# Layout, from `mdpo plan --model gpt-oss-120b --gpu h100-80g --nodes 4 --gpus-per-node 8 --reference precomputed
# --global-batch 256 --max-tokens 4096` (mdpo 0.1, 2026-12-07; a prediction, not measured: balanced routing and
# 1,010 tokens per pair assumed): TP=4 with sequence parallelism (Megatron's MoE layers need it under TP), PP=4,
# EP=8 with each expert whole on its rank (ETP=1: Megatron-Core takes expert biases only unsplit), DP=2, packs of
# 2 x 2048 tokens, the reference precomputed: 70.3 GiB per GPU (62.4 of weights, fp32 gradients and the distributed
# optimizer's state; 7.9 of activations), 0.92 s a step, 0.20 h for the 3 epochs. 2 nodes fit no layout (184.8 GiB
# at TP=2 x EP=8: the experts' fp32 gradients and optimizer state); 8 nodes halve the step (0.50 s, 49.7 GiB at the
# same TP, PP and EP). With PP > 1 the load-balancing loss is Megatron's per layer, each stage's own
# (docs/mixture-of-experts.md). mdpo runs gpt-oss on its local layers (sinks: docs/model-families.md#attention-sinks).
NNODES=${NNODES:-4}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local gpt-oss-120b HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/gpt_oss_120b_dpo}
TP=${TP:-4}
PP=${PP:-4}
EP=${EP:-8}
MAX_LENGTH=${MAX_LENGTH:-2048}
TEMPLATE=${TEMPLATE:-tokenizer}
RECIPE_ARGS=(parallel.ep="$EP" parallel.etp=1)  # TP > 1: sequence parallelism turns on by itself (MoE)
source "$(dirname "$0")/_dpo_recipe.sh"
