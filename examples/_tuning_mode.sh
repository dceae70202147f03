# Shared by examples/tuning.sh and the recipes with a LoRA variant (sourced, not run), as
# `source _tuning_mode.sh NAME VALUE`: VALUE 0 = full tuning, 1 = LoRA (rank 64, alpha 128, dropout 0.05, all of
# lora.targets unless the recipe narrows them). Sets MODE_ARGS (LoRA's key=value settings; none for full tuning) and
# exports BASE_LR where it is unset: 1e-6 for full tuning, 5e-6 for LoRA (LoRA DPO recipes use 5 to 50 times a full
# run's rate; not tuned here). Any other VALUE is one line naming the script and NAME.
case "$2" in
  0) MODE_ARGS=() && export BASE_LR=${BASE_LR:-1e-6} ;;
  1) MODE_ARGS=(lora.rank=64 lora.alpha=128 lora.dropout=0.05) && export BASE_LR=${BASE_LR:-5e-6} ;;
  *) echo "$(basename "$0"): $1 must be 0 (full tuning) or 1 (LoRA), got '$2'" >&2; exit 2 ;;
esac
