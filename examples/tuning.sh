#!/usr/bin/env bash
# The seed's launcher, on mdpo: `bash examples/tuning.sh MODE LOSS ROOT`, run the same way on every node.
#   MODE  0 = full tuning, 1 = LoRA (rank 64, alpha 128, dropout 0.05, on q/k/v, attention output, gate/up, down)
#   LOSS  any dpo.loss_type (sigmoid, ipo, hinge, ...)
#   ROOT  the seed's folders: ROOT/model/<HF model folder> and ROOT/data/<data file or folder>; runs go to
#         ROOT/runs/<model>_<loss>_mode<MODE> (WORK overrides it)
# The seed's hyperparameters: beta 0.1, global batch 128 x nodes, AdamW, linear schedule, warmup 0.1, 3 epochs,
# max length 8192, Tulu 2 template, lr 1e-6 x sqrt(nodes) for full tuning and 5e-6 x sqrt(nodes) for LoRA (mdpo's
# LoRA default: LoRA DPO recipes use 5 to 50 times a full run's rate; not tuned here). The layout is the 13B
# recipe's (TP=4 + sequence parallel inside a node, the reference precomputed once); NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE, TP, MAX_LENGTH and TEMPLATE come from the environment. Extra key=value
# arguments after ROOT go to every step (e.g. lora.rank=16).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash examples/tuning.sh MODE LOSS ROOT [key=value ...]  (MODE 0 = full tuning, 1 = LoRA)" >&2
  exit 2
fi
MODE=$1 LOSS=$2 ROOT=$3
shift 3
one_entry() {  # the single entry of a seed folder (the folder itself when it holds the model or several files)
  local folder=$1 entries
  [ -d "$folder" ] || { echo "tuning.sh: $folder: no such folder (ROOT must hold model/ and data/)" >&2; exit 2; }
  mapfile -t entries < <(find "$folder" -mindepth 1 -maxdepth 1 ! -name '.*' | sort)
  if [ ! -f "$folder/config.json" ] && [ ${#entries[@]} = 1 ]; then echo "${entries[0]}"; else echo "$folder"; fi
}
HF_MODEL=$(one_entry "$ROOT/model")
DATA=$(one_entry "$ROOT/data")
[ -f "$HF_MODEL/config.json" ] || { echo "tuning.sh: $HF_MODEL: no config.json (expected one HF model folder)" >&2; exit 2; }
source "$(dirname "$0")/_tuning_mode.sh" MODE "$MODE"  # BASE_LR and MODE_ARGS
WORK=${WORK:-$ROOT/runs/$(basename "$HF_MODEL")_${LOSS}_mode$MODE}
TP=${TP:-4}
MAX_LENGTH=${MAX_LENGTH:-8192}
TEMPLATE=${TEMPLATE:-tulu2}
RECIPE_ARGS=(parallel.sequence_parallel=$([ "$TP" -gt 1 ] && echo true || echo false) dpo.loss_type="$LOSS"
             "${MODE_ARGS[@]}" "$@")
set --  # the extras are in RECIPE_ARGS: the recipe passes them to the reference pass too
source "$(dirname "$0")/_dpo_recipe.sh"
