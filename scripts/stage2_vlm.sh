#!/usr/bin/env bash
# Stage 2 of a transformers-native VLM (Qwen2.5-VL, Gemma 3, LLaVA-OneVision, ... any folder that
# AutoModelForImageTextToText loads): its language model and projector, with the ExGra-Med alignment head, on records
# rendered with the model's own chat template. The same script fine-tunes (--no-alignment, VQA records).
# The settings are those of recipes/stage2_vlm.yaml (recipes/stage2_vlm_no_alignment.yaml with --no-alignment); this
# script adds the paths and your flags.
#
#   bash scripts/stage2_vlm.sh [--no-alignment] [extra trainer flags, which override the recipe]
#
# Variables: MODEL_PATH (the VLM folder or Hub id), DATA_PATH (records; with conversations_long for the alignment),
# IMAGE_FOLDER, OUTPUT_DIR (runs/stage2_vlm), ALPHA (--alpha of the alignment; default: the recipe's), plus the
# launcher variables of _launch.sh (NPROC_PER_NODE, DEEPSPEED, FSDP, ...).
# FSDP wraps the model's own layer classes (its _no_split_modules).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

RECIPE=stage2_vlm.yaml
OVERRIDES=()
if [ "${1:-}" = "--no-alignment" ]; then
  RECIPE=stage2_vlm_no_alignment.yaml  # no alignment, so ALPHA does not apply
  shift
elif [ -n "${ALPHA:-}" ]; then
  OVERRIDES+=(--alpha "$ALPHA")
fi

: "${MODEL_PATH:?set MODEL_PATH to a transformers-native VLM folder (e.g. Qwen2.5-VL-7B-Instruct)}"
: "${DATA_PATH:?set DATA_PATH to the training records (with conversations_long for the alignment)}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the images folder}"
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage2_vlm}

"$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train "$RECIPES_DIR/$RECIPE" \
  --model_name_or_path "$MODEL_PATH" \
  --data_path "$DATA_PATH" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  "${OVERRIDES[@]}" \
  "${BACKEND_ARGS[@]}" \
  "$@"
