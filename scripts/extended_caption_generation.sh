#!/usr/bin/env bash
# Extended captions for stage 2 (METHOD section 6), then the merge into `conversations_long`.
#
# Every path is a variable with a default relative to the repository; extra arguments go to
# `exgra-med extend-captions` (e.g. --concurrency 16 --max-attempts 8).
# The endpoint and key come from the environment or a .env file: OPENROUTER_API_KEY (+ OPENROUTER_ENDPOINT)
# or OPENAI_API_KEY (+ OPENAI_BASE_URL). Rerunning the script resumes: finished items are never requested
# again. Models used in the paper: openai/gpt-4o-mini, openai/gpt-4o, google/gemini-2.5-flash, qwen/qwen3-8b.
#
#   INPUT=data/llava_med_instruct_60k_inline_mention.json MODEL=qwen/qwen3-8b \
#     bash scripts/extended_caption_generation.sh --concurrency 16
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
INPUT="${INPUT:-$REPO_DIR/data/llava_med_instruct_60k_inline_mention.json}"
OUTPUT="${OUTPUT:-${INPUT%.json}.extended.json}"
MERGED="${MERGED:-${INPUT%.json}.long.json}"
MODEL="${MODEL:-openai/gpt-4o-mini}"
PROMPT="${PROMPT:-$REPO_DIR/exgra_med/prompts/extend_caption.txt}"

if [[ ! -f "$INPUT" ]]; then
  echo "extended_caption_generation.sh: input $INPUT not found (set INPUT=...)" >&2
  exit 2
fi

# --resume_from the output itself: the first run finds nothing there and starts afresh.
"$PYTHON" -m exgra_med.cli extend-captions \
  --original_instruction_fpath "$INPUT" \
  --system_prompt_fpath "$PROMPT" \
  --model_name "$MODEL" \
  --output "$OUTPUT" \
  --resume_from "$OUTPUT" \
  "$@"

"$PYTHON" -m exgra_med.cli merge-extended --original "$INPUT" --extended "$OUTPUT" --out "$MERGED"
