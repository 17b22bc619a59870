#!/usr/bin/env bash
# Stage 1 (feature alignment): train only the projector on image-caption conversations.
# The settings are those of recipes/stage1.yaml (the paper's); this script adds the paths and your flags.
#
#   MODEL_PATH=pretrained/llava-7b-v0 VISION_TOWER=pretrained/clip-vit-large-patch14 \
#   DATA_PATH=data/llava_med/alignment.json IMAGE_FOLDER=data/llava_med/images OUTPUT_DIR=runs/stage1 \
#   bash scripts/stage1.sh [extra trainer flags, which override the recipe]
#
# Variables: MODEL_PATH, VISION_TOWER, DATA_PATH, IMAGE_FOLDER, OUTPUT_DIR (runs/stage1), DENSE_CONNECTOR
# (--mm_dense_connector_type: sti | sci | dci; default: the recipe's none), plus the launcher variables of _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

: "${MODEL_PATH:?set MODEL_PATH to a local LLM folder (LLaVA-7b-v0 / Vicuna weights)}"
: "${VISION_TOWER:?set VISION_TOWER to a local CLIP folder or local-dir:BIOMEDCLIP_DIR}"
: "${DATA_PATH:?set DATA_PATH to the stage-1 alignment json}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the images folder}"
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage1}
OVERRIDES=()
[ -n "${DENSE_CONNECTOR:-}" ] && OVERRIDES+=(--mm_dense_connector_type "$DENSE_CONNECTOR")

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train "$RECIPES_DIR/stage1.yaml" \
  --model_name_or_path "$MODEL_PATH" \
  --vision_tower "$VISION_TOWER" \
  --data_path "$DATA_PATH" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  "${OVERRIDES[@]}" \
  "${BACKEND_ARGS[@]}" \
  "$@"
