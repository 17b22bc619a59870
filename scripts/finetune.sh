#!/usr/bin/env bash
# Fine-tuning on a medical VQA data set (projector + LLM), scoring val after every epoch and keeping the
# best epoch by eval_val_average (open recall / closed accuracy mean); the best model then answers test
# (OUTPUT_DIR/test_answers.jsonl, OUTPUT_DIR/test_results.json).
#
#   bash scripts/finetune.sh DATASET [--dci] [extra trainer flags, which override the recipe]
#   DATASET   vqa-rad | slake | pathvqa (the reference recipes), or any name with LR set
#   --dci     the recipe of the DCI checkpoint (exgra-med-dci); the connector itself comes from MODEL_PATH
#
# The settings are those of recipes/finetune_DATASET[_dci].yaml (vqa-rad -> finetune_vqa_rad.yaml), the reference's
# (scripts/llava1-5_stage2_*.sh of the reference; 2 GPUs); any other data set runs the VQA-RAD recipe with LR as its
# learning rate. This script adds the paths and your flags.
# The reference evaluated every 122 / 116 steps; here val is scored once per epoch (HF Trainer needs the
# same eval and save schedule to keep the best checkpoint).
#
# Variables: MODEL_PATH (stage-2 checkpoint; default: the recipe's pretrained/exgra-med[-dci]), DATA_DIR (prepared
# train/val/test.json + images/; default data/DATASET), IMAGE_FOLDER, OUTPUT_DIR (runs/finetune/DATASET[-dci]), and,
# each overriding one value of the recipe when set: LR, EPOCHS, BATCH (per device), GRAD_ACCUM, EVAL_BATCH,
# EVAL_MAX_NEW_TOKENS; plus the launcher variables of _launch.sh (NPROC_PER_NODE, FSDP="full_shard auto_wrap",
# DEEPSPEED, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

DATASET=${1:?usage: finetune.sh DATASET [--dci] [trainer flags]  (DATASET: vqa-rad | slake | pathvqa)}
shift
DCI=0
if [ "${1:-}" = "--dci" ]; then
  DCI=1
  shift
fi
SUFFIX=$([ "$DCI" = 1 ] && echo "-dci" || true)

case "$DATASET" in
  vqa-rad|slake|pathvqa) RECIPE=finetune_${DATASET//-/_} ;;
  *) : "${LR:?"unknown data set $DATASET: set LR (and EPOCHS, BATCH)"}"; RECIPE=finetune_vqa_rad ;;
esac
RECIPE="$RECIPES_DIR/$RECIPE${SUFFIX//-/_}.yaml"

DATA_DIR=${DATA_DIR:-data/${DATASET//-/_}}
IMAGE_FOLDER=${IMAGE_FOLDER:-$DATA_DIR/images}
OUTPUT_DIR=${OUTPUT_DIR:-runs/finetune/$DATASET$SUFFIX}
for f in "$DATA_DIR/train.json" "$DATA_DIR/val.json" "$DATA_DIR/test.json"; do
  [ -f "$f" ] || { echo "finetune.sh: $f not found (run exgra-med prepare $DATASET, or set DATA_DIR)" >&2; exit 2; }
done

# Each variable that is set overrides its flag of the recipe.
OVERRIDES=()
for pair in MODEL_PATH:model_name_or_path LR:learning_rate EPOCHS:num_train_epochs \
            BATCH:per_device_train_batch_size GRAD_ACCUM:gradient_accumulation_steps EVAL_BATCH:eval_batch_size \
            EVAL_MAX_NEW_TOKENS:eval_max_new_tokens; do
  variable=${pair%%:*}
  if [ -n "${!variable:-}" ]; then
    OVERRIDES+=("--${pair#*:}" "${!variable}")
  fi
done

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train "$RECIPE" \
  --data_path "$DATA_DIR/train.json" \
  --val_data_path "$DATA_DIR/val.json" \
  --test_data_path "$DATA_DIR/test.json" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  "${OVERRIDES[@]}" \
  "${BACKEND_ARGS[@]}" \
  "$@"
