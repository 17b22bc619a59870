#!/usr/bin/env bash
# Zero-shot multiple-choice classification on OmniMedVQA: accuracy per question file and overall.
# Decoding as the reference: sampling at temperature 0.7, 256 new tokens (--temperature 0: greedy).
# Items whose image cannot be read or whose generation fails are listed in OUT_DIR/results.json and scored
# both ways: `accuracy` counts them wrong, `accuracy_reference` drops them (what the reference reports).
#
#   bash scripts/zero_shot_classification.sh [extra zero-shot flags, e.g. --batch-size 32]
#
# Variables: MODEL_PATH (checkpoint), OMNIMED_DIR (the OmniMedVQA release folder the records' image_path
# is relative to), QUESTIONS (a prepared question file or folder; default: every file of
# data/omnimedvqa, written by `exgra-med prepare omnimedvqa`), OUT_DIR (predictions + results.json).
# One file, as in the reference: QUESTIONS="data/omnimedvqa/Open-access/NLM- Malaria Data.json".
# A rerun resumes every file where it stopped and retries the items that failed.
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH to a checkpoint folder (e.g. pretrained/exgra-med-dci)}"
: "${OMNIMED_DIR:?set OMNIMED_DIR to the OmniMedVQA folder (image paths are relative to it)}"
QUESTIONS=${QUESTIONS:-data/omnimedvqa}
OUT_DIR=${OUT_DIR:-runs/zero_shot/$(basename "$MODEL_PATH")}

exgra-med zero-shot \
  --model "$MODEL_PATH" \
  --question-file "$QUESTIONS" \
  --image-folder "$OMNIMED_DIR" \
  --out "$OUT_DIR" \
  --batch-size "${BATCH_SIZE:-16}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-256}" \
  "$@"
