#!/usr/bin/env bash
# Stage 2 (instruction tuning): projector + LLM, with the ExGra-Med multi-graph alignment by default.
# The settings are those of recipes/stage2_exgra_med.yaml (recipes/stage2_llava_med.yaml with --llava-med), the
# paper's; this script adds the paths and your flags.
#
#   bash scripts/stage2.sh [--llava-med] [extra trainer flags, which override the recipe]
#   --llava-med   the LLaVA-Med baseline: the same run with the alignment loss off (data-efficiency comparison)
#
# Variables: MODEL_PATH, VISION_TOWER, DATA_PATH (records with conversations_long), IMAGE_FOLDER,
# PROJECTOR (stage-1 output folder), OUTPUT_DIR (runs/stage2), ALPHA (--alpha of the alignment; default: the
# recipe's), DENSE_CONNECTOR (--mm_dense_connector_type; default: the recipe's), plus the launcher variables of
# _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

RECIPE=stage2_exgra_med.yaml
OVERRIDES=()
if [ "${1:-}" = "--llava-med" ]; then
  RECIPE=stage2_llava_med.yaml  # no alignment, so ALPHA does not apply
  shift
elif [ -n "${ALPHA:-}" ]; then
  OVERRIDES+=(--alpha "$ALPHA")
fi
[ -n "${DENSE_CONNECTOR:-}" ] && OVERRIDES+=(--mm_dense_connector_type "$DENSE_CONNECTOR")

: "${MODEL_PATH:?set MODEL_PATH to a local LLM folder (LLaVA-7b-v0 / Vicuna weights)}"
: "${VISION_TOWER:?set VISION_TOWER to a local CLIP folder or local-dir:BIOMEDCLIP_DIR}"
: "${DATA_PATH:?set DATA_PATH to the stage-2 instruct json (with conversations_long)}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the images folder}"
: "${PROJECTOR:?set PROJECTOR to the stage-1 output folder (mm_projector.safetensors)}"
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage2}

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train "$RECIPES_DIR/$RECIPE" \
  --model_name_or_path "$MODEL_PATH" \
  --vision_tower "$VISION_TOWER" \
  --pretrain_mm_mlp_adapter "$PROJECTOR" \
  --data_path "$DATA_PATH" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  "${OVERRIDES[@]}" \
  "${BACKEND_ARGS[@]}" \
  "$@"
