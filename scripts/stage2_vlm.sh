#!/usr/bin/env bash
# Stage 2 of a transformers-native VLM (Qwen2.5-VL, Gemma 3, LLaVA-OneVision, ... any folder that
# AutoModelForImageTextToText loads): its language model and projector, with the ExGra-Med alignment head, on records
# rendered with the model's own chat template. The same script fine-tunes (--no-alignment, VQA records).
#
#   bash scripts/stage2_vlm.sh [--no-alignment] [extra trainer flags]
#
# Variables: MODEL_PATH (the VLM folder or Hub id), DATA_PATH (records; with conversations_long for the alignment),
# IMAGE_FOLDER, OUTPUT_DIR, ALPHA, plus the launcher variables of _launch.sh (NPROC_PER_NODE, DEEPSPEED, FSDP, ...).
# FSDP wraps the model's own layer classes (its _no_split_modules).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

ALIGN_ARGS=(--contrastive True --multi_graph True --after_de True --alpha "${ALPHA:-1.0}")
if [ "${1:-}" = "--no-alignment" ]; then
  ALIGN_ARGS=(--contrastive False --multi_graph False --after_de False)
  shift
fi

: "${MODEL_PATH:?set MODEL_PATH to a transformers-native VLM folder (e.g. Qwen2.5-VL-7B-Instruct)}"
: "${DATA_PATH:?set DATA_PATH to the training records (with conversations_long for the alignment)}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the images folder}"
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage2_vlm}

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train \
  --model_name_or_path "$MODEL_PATH" \
  --data_path "$DATA_PATH" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  "${ALIGN_ARGS[@]}" \
  --bf16 True \
  --num_train_epochs 3 \
  --per_device_train_batch_size 16 \
  --gradient_accumulation_steps 1 \
  --learning_rate 2e-5 \
  --weight_decay 0.0 \
  --warmup_steps 0.03 \
  --lr_scheduler_type cosine \
  --model_max_length 2048 \
  --save_strategy steps --save_steps 1000 --save_total_limit 2 \
  --logging_steps 10 \
  --activation_checkpointing True \
  --dataloader_num_workers 4 \
  --report_to none \
  "${BACKEND_ARGS[@]}" \
  "$@"
