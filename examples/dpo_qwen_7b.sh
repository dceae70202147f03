#!/usr/bin/env bash
# DPO of Qwen 1.0 7B (QWenLMHeadModel, converted with its remote-code files kept) on UltraFeedback-binarized, one node x 8 GPUs (80 GB).
#   NNODES=1 HF_MODEL=/models/Qwen-7B DATA=/data/ultrafeedback_binarized/train_prefs bash examples/dpo_qwen_7b.sh
# Layout: 7B with Qwen's 151,936-token vocabulary at TP=2 (vocab-parallel logits of an 8192-token pack ~2.5 GB per GPU in fp32).
# Distributed optimizer over DP, precomputed reference, packing (examples/_dpo_recipe.sh); see dpo_tulu2_13b.sh.
# Sequence parallel runs on Transformer Engine's layers (NGC PyTorch containers have TE) and on Megatron-Core's
# local ones (no TE, or model.attention=sdpa: there each pair's prompt is also computed once, data.share_prompt).
NNODES=${NNODES:-1}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local Qwen-7B HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/qwen_7b_dpo}
TP=${TP:-2}
MAX_LENGTH=4096
TEMPLATE=tokenizer
RECIPE_ARGS=(parallel.sequence_parallel=true)
source "$(dirname "$0")/_dpo_recipe.sh"
