# Shared by examples/dpo_*.sh (sourced, not run): convert once, precompute the reference once, then train (a rerun
# resumes from the last checkpoint) and export the policy to $WORK/hf. The recipe sets HF_MODEL, DATA, WORK, TP,
# PP (default 1), MAX_LENGTH, TEMPLATE and RECIPE_ARGS (its own key=value settings) first; NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, GPUS_PER_NODE and EXIT_DURATION_MINUTES (a time budget) come from the environment. lr = BASE_LR (default 1e-6) x sqrt(nodes), global
# batch = GLOBAL_BATCH (default 128 x nodes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PP=${PP:-1}
: "${HF_MODEL:?set HF_MODEL to a local HF model folder}" "${DATA:?set DATA to the preference data files}"
BASE_LR=${BASE_LR:-1e-6}
GLOBAL_BATCH=${GLOBAL_BATCH:-$((128 * NNODES))}
LR=$(python -c "import math; print($BASE_LR * math.sqrt($NNODES))")

# 1. HF -> Megatron once (node 0; WORK is on a shared filesystem), in one process that holds about one shard.
if [ "$NODE_RANK" = 0 ] && [ ! -f "$WORK/mcore/mdpo_model.json" ]; then
  mdpo convert hf-to-megatron --hf "$HF_MODEL" --out "$WORK/mcore"
fi
until [ -f "$WORK/mcore/mdpo_model.json" ]; do sleep 10; done

LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m mdpo)
ARGS=(
  model.init_from="$WORK/mcore" data.tokenizer="$WORK/mcore" data.train_file="$DATA" data.template="$TEMPLATE"
  data.max_length="$MAX_LENGTH" data.packing=true data.pack_tokens=$((2 * MAX_LENGTH))
  parallel.tp="$TP" parallel.pp="$PP" parallel.distributed_optimizer=true parallel.overlap_grad_reduce=true
  schedule.global_batch_size="$GLOBAL_BATCH" schedule.epochs=3 schedule.warmup_ratio=0.1
  optimizer.lr="$LR" optimizer.weight_decay=0.0 optimizer.clip_grad=1.0 dpo.beta=0.1 dpo.loss_type=sigmoid
  dpo.reference=precomputed dpo.reference_cache="$WORK/reference"
  logging.run_dir="$WORK" checkpoint.save_interval=100 checkpoint.export_hf=true
  "${RECIPE_ARGS[@]}"
)
# 2. The reference log-probs, once (a stale or partial cache is refused by training with a message); the extra
#    key=value arguments go to it too, so that data settings among them reach both passes.
[ -f "$WORK/reference/train.safetensors" ] || "${LAUNCH[@]}" precompute-ref "${ARGS[@]}" "$@"
# 3. DPO. A time budget from the environment (EXIT_DURATION_MINUTES: the job's limit less the time a save takes;
#    Megatron's --exit-duration-in-mins), less what the steps above took: training saves and exits 0 before its next
#    step would pass it, and the same command resumes.
BUDGET=()
if [ -n "${EXIT_DURATION_MINUTES:-}" ]; then
  BUDGET=(schedule.exit_duration_minutes="$(python -c "print(max(0.1, $EXIT_DURATION_MINUTES - $SECONDS / 60))")")
fi
"${LAUNCH[@]}" train "${ARGS[@]}" "${BUDGET[@]}" "$@"
