#!/usr/bin/env bash
# Stage 1 (feature alignment): train only the projector on image-caption conversations.
# Reference recipe: 1 epoch, batch 16 x 4 GPUs, grad-accum 2, lr 2e-3, cosine, warmup 0.03, bf16, max len 2048.
#
#   MODEL_PATH=pretrained/llava-7b-v0 VISION_TOWER=pretrained/clip-vit-large-patch14 \
#   DATA_PATH=data/llava_med/alignment.json IMAGE_FOLDER=data/llava_med/images OUTPUT_DIR=runs/stage1 \
#   bash scripts/stage1.sh [extra trainer flags, which override the defaults below]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

: "${MODEL_PATH:?set MODEL_PATH to a local LLM folder (LLaVA-7b-v0 / Vicuna weights)}"
: "${VISION_TOWER:?set VISION_TOWER to a local CLIP folder or local-dir:BIOMEDCLIP_DIR}"
: "${DATA_PATH:?set DATA_PATH to the stage-1 alignment json}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the images folder}"
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage1}

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train \
  --model_name_or_path "$MODEL_PATH" \
  --vision_tower "$VISION_TOWER" \
  --data_path "$DATA_PATH" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  --tune_mm_mlp_adapter True \
  --mm_projector_type mlp2x_gelu \
  --mm_dense_connector_type "${DENSE_CONNECTOR:-none}" \
  --mm_vision_select_layer -2 \
  --mm_use_im_start_end True \
  --bf16 True \
  --num_train_epochs 1 \
  --per_device_train_batch_size 16 \
  --gradient_accumulation_steps 2 \
  --learning_rate 2e-3 \
  --weight_decay 0.0 \
  --warmup_steps 0.03 \
  --lr_scheduler_type cosine \
  --model_max_length 2048 \
  --save_strategy steps --save_steps 500 --save_total_limit 2 \
  --logging_steps 10 \
  --activation_checkpointing True \
  --dataloader_num_workers 4 \
  --report_to none \
  "${BACKEND_ARGS[@]}" \
  "$@"
