#!/usr/bin/env bash
# Fine-tuning on a medical VQA data set (projector + LLM), scoring val after every epoch and keeping the
# best epoch by eval_val_average (open recall / closed accuracy mean); the best model then answers test
# (OUTPUT_DIR/test_answers.jsonl, OUTPUT_DIR/test_results.json).
#
#   bash scripts/finetune.sh DATASET [--dci] [extra trainer flags, which override the ones below]
#   DATASET   vqa-rad | slake | pathvqa (the reference recipes), or any name with LR set
#   --dci     the recipe of the DCI checkpoint (exgra-med-dci); the connector itself comes from MODEL_PATH
#
# Reference recipes (scripts/llava1-5_stage2_*.sh of the reference; 2 GPUs):
#   vqa-rad  lr 4e-5 (dci 2e-5), 15 epochs, batch 32 per GPU
#   slake    lr 4e-5 (dci 4e-5), 15 epochs (dci 18), batch 64 per GPU
#   pathvqa  lr 3e-5 (dci 2e-5), 15 epochs, batch 32 per GPU
#   all: cosine schedule, warmup 3%, weight decay 0, bf16, max length 2048, gradient checkpointing.
# The reference evaluated every 122 / 116 steps; here val is scored once per epoch (HF Trainer needs the
# same eval and save schedule to keep the best checkpoint).
#
# Variables: MODEL_PATH (stage-2 checkpoint), DATA_DIR (prepared train/val/test.json + images/),
# IMAGE_FOLDER, OUTPUT_DIR, LR, EPOCHS, BATCH (per device), GRAD_ACCUM, EVAL_BATCH, EVAL_MAX_NEW_TOKENS,
# plus the launcher variables of _launch.sh (NPROC_PER_NODE, FSDP="full_shard auto_wrap", DEEPSPEED, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

DATASET=${1:?usage: finetune.sh DATASET [--dci] [trainer flags]  (DATASET: vqa-rad | slake | pathvqa)}
shift
DCI=0
if [ "${1:-}" = "--dci" ]; then
  DCI=1
  shift
fi

case "$DATASET:$DCI" in
  vqa-rad:0) lr=4e-5 epochs=15 batch=32 ;;
  vqa-rad:1) lr=2e-5 epochs=15 batch=32 ;;
  slake:0)   lr=4e-5 epochs=15 batch=64 ;;
  slake:1)   lr=4e-5 epochs=18 batch=64 ;;
  pathvqa:0) lr=3e-5 epochs=15 batch=32 ;;
  pathvqa:1) lr=2e-5 epochs=15 batch=32 ;;
  *)         lr=${LR:?"unknown data set $DATASET: set LR (and EPOCHS, BATCH)"} epochs=15 batch=32 ;;
esac
SUFFIX=$([ "$DCI" = 1 ] && echo "-dci" || true)

MODEL_PATH=${MODEL_PATH:-pretrained/exgra-med$SUFFIX}
DATA_DIR=${DATA_DIR:-data/${DATASET//-/_}}
IMAGE_FOLDER=${IMAGE_FOLDER:-$DATA_DIR/images}
OUTPUT_DIR=${OUTPUT_DIR:-runs/finetune/$DATASET$SUFFIX}
for f in "$DATA_DIR/train.json" "$DATA_DIR/val.json" "$DATA_DIR/test.json"; do
  [ -f "$f" ] || { echo "finetune.sh: $f not found (run exgra-med prepare $DATASET, or set DATA_DIR)" >&2; exit 2; }
done

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train \
  --model_name_or_path "$MODEL_PATH" \
  --data_path "$DATA_DIR/train.json" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  --evaluate_on_val True --val_data_path "$DATA_DIR/val.json" \
  --evaluate_on_test True --test_data_path "$DATA_DIR/test.json" \
  --eval_batch_size "${EVAL_BATCH:-64}" \
  --eval_max_new_tokens "${EVAL_MAX_NEW_TOKENS:-1024}" \
  --eval_strategy epoch --save_strategy epoch --save_total_limit 1 \
  --load_best_model_at_end True --metric_for_best_model eval_val_average --greater_is_better True \
  --bf16 True \
  --num_train_epochs "${EPOCHS:-$epochs}" \
  --per_device_train_batch_size "${BATCH:-$batch}" \
  --gradient_accumulation_steps "${GRAD_ACCUM:-1}" \
  --learning_rate "${LR:-$lr}" \
  --weight_decay 0.0 \
  --warmup_steps 0.03 \
  --lr_scheduler_type cosine \
  --model_max_length 2048 \
  --logging_steps 10 \
  --activation_checkpointing True \
  --dataloader_num_workers 4 \
  --report_to none \
  "${BACKEND_ARGS[@]}" \
  "$@"
