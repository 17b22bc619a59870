#!/usr/bin/env bash
# Medical visual chatbot benchmark: an LLM judge scores a model's answers against reference answers
# (LLaVA-Med's GPT review) and reports scores per question type, per domain and overall.
#
# Every path is a variable with a default relative to the repository; extra arguments go to
# `exgra-med chatbot-review` (e.g. --concurrency 8). The answers file holds JSON lines
# {question_id, text} produced by the answer generator. Rerunning resumes an interrupted review.
# The endpoint and key come from the environment or a .env file (see scripts/extended_caption_generation.sh).
#
#   ANSWERS=results/chatbot/exgra-med.jsonl JUDGE=openai/gpt-4o bash scripts/chatbot_eval.sh
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
QUESTIONS="${QUESTIONS:-$REPO_DIR/data/eval/llava_med_eval_qa50_qa.jsonl}"
ANSWERS="${ANSWERS:-$REPO_DIR/results/chatbot/answers.jsonl}"
REFERENCE="${REFERENCE:-$QUESTIONS}"   # the LLaVA-Med question file carries `gpt4_answer`
OUT="${OUT:-$REPO_DIR/results/chatbot/review}"
JUDGE="${JUDGE:-openai/gpt-4o}"

for f in "$QUESTIONS" "$ANSWERS" "$REFERENCE"; do
  if [[ ! -f "$f" ]]; then
    echo "chatbot_eval.sh: $f not found (set QUESTIONS / ANSWERS / REFERENCE)" >&2
    exit 2
  fi
done

resume=()
if [[ -s "$OUT/reviews.jsonl.progress.jsonl" ]]; then
  resume=(--resume)
fi

"$PYTHON" -m exgra_med.cli chatbot-review \
  --question-file "$QUESTIONS" \
  --answers "$ANSWERS" \
  --reference "$REFERENCE" \
  --out "$OUT" \
  --judge-model "$JUDGE" \
  "${resume[@]}" \
  "$@"
