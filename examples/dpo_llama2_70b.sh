#!/usr/bin/env bash
# DPO of Llama 2 70B (or Tulu 2 70B) on UltraFeedback-binarized, 4 nodes x 8 A800-80G (or 8 nodes: NNODES=8).
#   NNODES=4 NODE_RANK=... MASTER_ADDR=... HF_MODEL=/models/llama-2-70b DATA=/data/ultrafeedback_binarized/train_prefs \
#     bash examples/dpo_llama2_70b.sh
# Layout from the planner (mdpo plan --model llama2-70b --nodes 4 --gpu a800-80g --global-batch 512), the seed's
# workload (61k pairs x 3 epochs, 1,010 tokens per pair, packs of 8,192, precomputed reference, efficiency 0.35
# as fitted on a 1.1B on one H100/H200):
#   4 nodes, TP=8 PP=4 DP=1 + SP, 4 model chunks per stage (parallel.vpp: the interleaved schedule's bubble is a
#   quarter of 1F1B's), selective recompute: 73.3 GiB per GPU (36.4 weights/grads/optimizer, 36.9 activations:
#   interleaving's warmup keeps more micro-batches in flight), 57.7 s per step, 6.3 h; without interleaving (VPP=1
#   RECOMPUTE=none) 70.2 GiB, 59.8 s, 6.5 h.
#   8 nodes (NNODES=8, global batch 1,024): TP=8 PP=2 x VPP=4 DP=4 + SP, selective: 71.1 GiB, 57.4 s per step,
#   3.1 h; set PP=2.
# The same recipe trains other Llama-architecture sizes (HF_MODEL=..., TP=..., PP=...): a 34B (codellama-34b), 4 nodes,
# at TP=4 PP=2 DP=4 + SP, 69.8 GiB, 28.6 s per step, 3.1 h; Qwen 72B on 8 nodes goes through dpo_qwen_7b.sh with
# TP=8 PP=2: 68.5 GiB, 60.6 s per step, 3.3 h.
# These count each pair's prompt once (data.share_prompt, on Megatron-Core's local layers: model.attention=sdpa);
# Transformer Engine's layers take no shared prompt and compute it twice (mdpo plan --no-share-prompt: 4 nodes
# 69.5 GiB, 73.8 s per step, 8.0 h). They are predictions (the planner is validated on CPU and on a 1.1B on one GPU,
# not at 70B); the first steps' peak_memory_gib and tokens_per_second in metrics.jsonl say how close they are.
NNODES=${NNODES:-4}
HF_MODEL=${HF_MODEL:?set HF_MODEL to a local llama-2-70b HF folder}
DATA=${DATA:?set DATA to the preference data files (e.g. UltraFeedback-binarized train_prefs)}
WORK=${WORK:-runs/llama2_70b_dpo}
TP=${TP:-8}
PP=${PP:-4}
VPP=${VPP:-4}
RECOMPUTE=${RECOMPUTE:-selective}
MAX_LENGTH=4096
TEMPLATE=tulu2
RECIPE_ARGS=(parallel.sequence_parallel=true parallel.vpp="$VPP" parallel.recompute="$RECOMPUTE")
source "$(dirname "$0")/_dpo_recipe.sh"
