#!/usr/bin/env bash
# DPO of Baichuan 2 13B (BaichuanForCausalLM, with ALiBi and NormHead, both handled in the model)
# on UltraFeedback-binarized, one node x 8 GPUs (80 GB).
#   NNODES=1 HF_MODEL=/models/Baichuan2-13B-Base DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_baichuan2_13b.sh
# Layout: 13B at TP=4 (weights, fp32 grads and sharded optimizer states ~39 GB per GPU at DP=2), with
# selective recompute of the attention (ALiBi bias masks are materialised per micro-batch); packs of 8192 tokens.
# Distributed optimizer over DP, precomputed reference, packing (examples/_dpo_recipe.sh); see dpo_tulu2_13b.sh.
# ALiBi runs on torch SDPA (not TE); selective recompute here. parallel.sequence_parallel=true also runs on that
# path (Megatron-Core's local layers) and splits the norm and residual activations over the TP ranks too.
NNODES=${NNODES:-1}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local Baichuan2-13B-Base HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/baichuan2_13b_dpo}
TP=4
MAX_LENGTH=4096
TEMPLATE=tokenizer
RECIPE_ARGS=(parallel.recompute=selective)
source "$(dirname "$0")/_dpo_recipe.sh"
