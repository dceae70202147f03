#!/usr/bin/env bash
# DPO of Llama 2 7B (LlamaForCausalLM) on UltraFeedback-binarized, one node x 8 GPUs (80 GB).
#   NNODES=1 HF_MODEL=/models/llama-2-7b DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_llama2_7b.sh
# Layout: 7B at TP=2 (state 7e9 x (2 + 4) / 2 + 7e9 x 12 / 8 = 31.5 GB on one 8-GPU node; packs of 8192 tokens with SP ~14 GB of activations).
# Distributed optimizer over DP, precomputed reference, packing (examples/_dpo_recipe.sh); see dpo_tulu2_13b.sh.
# Sequence parallel runs on Transformer Engine's layers (NGC PyTorch containers have TE) and on Megatron-Core's
# local ones (no TE, or model.attention=sdpa: there each pair's prompt is also computed once, data.share_prompt).
NNODES=${NNODES:-1}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local llama-2-7b HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/llama2_7b_dpo}
TP=2
MAX_LENGTH=4096
TEMPLATE=tulu2
RECIPE_ARGS=(parallel.sequence_parallel=true)
source "$(dirname "$0")/_dpo_recipe.sh"
