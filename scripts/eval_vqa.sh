#!/usr/bin/env bash
# VQA evaluation of a checkpoint: answers generated in chunks over the visible GPUs (one process per GPU;
# on a CPU machine NUM_CHUNKS processes), merged in question order, then scored with the reference metrics.
#
#   bash scripts/eval_vqa.sh [extra generate-vqa flags, e.g. --max-new-tokens 128]
#
# Variables: MODEL_PATH (checkpoint), DATA_DIR (prepared test.json + candidate.json + images/),
# QUESTION_FILE (default $DATA_DIR/test.json), IMAGE_FOLDER, CANDIDATE, OUT_DIR (answers + scores),
# NUM_CHUNKS (default: number of visible GPUs, or 1), BATCH_SIZE (default 16), TRAIN_FILE (training records: adds
# the answer-prior baselines to the grounding audit), GROUNDING_AUDIT (default 1; 0 skips the audit; it reuses the
# real-image answers and answers the blank and shuffled images).
# A rerun resumes: every chunk skips the questions it has already answered.
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH to a fine-tuned checkpoint folder}"
: "${DATA_DIR:?set DATA_DIR to a prepared VQA folder (test.json, candidate.json, images/)}"
QUESTION_FILE=${QUESTION_FILE:-$DATA_DIR/test.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$DATA_DIR/images}
CANDIDATE=${CANDIDATE:-$DATA_DIR/candidate.json}
OUT_DIR=${OUT_DIR:-$MODEL_PATH/eval}
BATCH_SIZE=${BATCH_SIZE:-16}
CHUNK_ARGS=()
[ -n "${NUM_CHUNKS:-}" ] && CHUNK_ARGS=(--num-chunks "$NUM_CHUNKS")

mkdir -p "$OUT_DIR"
ANSWERS="$OUT_DIR/$(basename "${QUESTION_FILE%.json}")_answers.jsonl"

echo "== answers -> $ANSWERS"
exgra-med generate-vqa-multi "${CHUNK_ARGS[@]}" \
  --model "$MODEL_PATH" \
  --question-file "$QUESTION_FILE" \
  --image-folder "$IMAGE_FOLDER" \
  --answers-file "$ANSWERS" \
  --batch-size "$BATCH_SIZE" \
  --conv-template simple \
  "$@"

echo "== scores -> ${ANSWERS%.jsonl}_scores.json"
exgra-med score --gt "$QUESTION_FILE" --pred "$ANSWERS" --candidate "$CANDIDATE" --json "${ANSWERS%.jsonl}_scores.json"

if [ "${GROUNDING_AUDIT:-1}" != "0" ]; then
  echo "== grounding audit (real, blank and shuffled images) -> ${ANSWERS%.jsonl}_grounding.json"
  exgra-med grounding-audit --model "$MODEL_PATH" --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER" \
    --candidate "$CANDIDATE" ${TRAIN_FILE:+--train "$TRAIN_FILE"} --batch-size "$BATCH_SIZE" --conv-template simple \
    --answers-file "$ANSWERS" --out "${ANSWERS%.jsonl}_grounding.json" "$@"
fi
