#!/usr/bin/env bash
# Stage 2 (instruction tuning): projector + LLM, with the ExGra-Med multi-graph alignment by default.
# Reference recipe: 3 epochs, batch 16 x 4 GPUs, lr 2e-5, contrastive/after_de/multi_graph True, alpha 1.0, FSDP.
#
#   bash scripts/stage2.sh [--llava-med] [extra trainer flags]
#   --llava-med   the LLaVA-Med baseline: the same run with the alignment loss off (data-efficiency comparison)
#
# Variables: MODEL_PATH, VISION_TOWER, DATA_PATH (records with conversations_long), IMAGE_FOLDER,
# PROJECTOR (stage-1 output folder), OUTPUT_DIR, ALPHA, plus the launcher variables of _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

ALIGN_ARGS=(--contrastive True --multi_graph True --after_de True --alpha "${ALPHA:-1.0}")
if [ "${1:-}" = "--llava-med" ]; then
  ALIGN_ARGS=(--contrastive False --multi_graph False --after_de False)
  shift
fi

: "${MODEL_PATH:?set MODEL_PATH to a local LLM folder (LLaVA-7b-v0 / Vicuna weights)}"
: "${VISION_TOWER:?set VISION_TOWER to a local CLIP folder or local-dir:BIOMEDCLIP_DIR}"
: "${DATA_PATH:?set DATA_PATH to the stage-2 instruct json (with conversations_long)}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the images folder}"
: "${PROJECTOR:?set PROJECTOR to the stage-1 output folder (mm_projector.safetensors)}"
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage2}

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train \
  --model_name_or_path "$MODEL_PATH" \
  --vision_tower "$VISION_TOWER" \
  --pretrain_mm_mlp_adapter "$PROJECTOR" \
  --data_path "$DATA_PATH" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  --mm_projector_type mlp2x_gelu \
  --mm_dense_connector_type "${DENSE_CONNECTOR:-none}" \
  --mm_vision_select_layer -2 \
  --mm_use_im_start_end True \
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
