# Shared by examples/tuning.sh and the recipes with a LoRA variant (sourced, not run): MODE (set first) 0 = full
# tuning, 1 = LoRA (rank 64, alpha 128, dropout 0.05, mdpo's LoRA defaults for a recipe); sets MODE_ARGS (its
# key=value settings) and exports BASE_LR: 1e-6 for full tuning, 5e-6 for LoRA (LoRA DPO recipes use 5 to 50 times a
# full run's rate; not tuned here). A bad MODE is one line naming the script.
case "$MODE" in
  0) BASE_LR=1e-6 MODE_ARGS=() ;;
  1) BASE_LR=5e-6 MODE_ARGS=(lora.rank=64 lora.alpha=128 lora.dropout=0.05) ;;
  *) echo "$(basename "$0"): MODE must be 0 (full tuning) or 1 (LoRA), got '$MODE'" >&2; exit 2 ;;
esac
export BASE_LR
