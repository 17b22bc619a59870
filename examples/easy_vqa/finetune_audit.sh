#!/usr/bin/env bash
# Demo, last part (called by examples/easy_vqa/demo.sh): fine-tune the demo's stage-2 checkpoint on easy-VQA with
# scripts/finetune.sh (CPU settings), then one `exgra-med grounding-audit` (batch 16): the test questions answered
# with the real, blank and shuffled images, scored beside two answer-prior baselines (majority answer, question
# prior), then the counterfactual rows (each question asked again on its image with the shape recoloured or swapped
# so that its answer changes: the shares of answers that follow the new truth, stay with the old one or neither, with
# 95% intervals; yes/no questions paired with the same question about another colour or shape); the real-image
# answers are written as generate-vqa writes them and scored with the reference metrics.
#
#   DEMO_DIR=runs/demo bash examples/easy_vqa/finetune_audit.sh
# Needs DEMO_DIR/stage2 (stage-2 checkpoint) and DEMO_DIR/data (prepared easy-VQA).
# BALANCE_YES_NO=1 fine-tunes on train.json with its yes/no questions balanced (`exgra-med subsample
# --balance-yes-no`: per question text as many yes as no answers), which takes the wording's prior away from the
# yes/no answers (86% of easy-VQA's are predicted by the question alone); measured in the README's demo section.
# FINETUNE_FLAGS: extra trainer flags of the fine-tuning (e.g. "--tune_vision_tower True").
# FINETUNE_DATA=F fine-tunes on the VQA records of F instead of DEMO_DIR/data/train.json (e.g. the rationale answers
# of `python -m examples.easy_vqa.rationale_answers`); FINETUNE_OUT (default DEMO_DIR/finetune) keeps such a run apart.
# Variables: DEMO_DIR, FINETUNE_STEPS (default 600), BATCH (32), FINETUNE_LR (3e-3), TEST_QUESTIONS
# (seeded subset of test.json, default 600; 0 = all), EVAL_BATCH (16), MAX_NEW_TOKENS (8), SEED, CONV_MODE (the
# template of fine-tuning and evaluation; default: the one the stage-2 checkpoint was trained with), COUNTERFACTUAL
# (auto: the counterfactual rows, about half as many answers again as the real, blank and shuffled images; off: none).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the repository root

DEMO_DIR=${DEMO_DIR:-runs/demo}
FINETUNE_STEPS=${FINETUNE_STEPS:-600}
BATCH=${BATCH:-32}
TEST_QUESTIONS=${TEST_QUESTIONS:-600}
EVAL_BATCH=${EVAL_BATCH:-16}
SEED=${SEED:-0}
DATA="$DEMO_DIR/data"
OUT=${FINETUNE_OUT:-$DEMO_DIR/finetune}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NPROC_PER_NODE=${NPROC_PER_NODE:-1} MASTER_PORT=${MASTER_PORT:-29512}
[ -f "$DEMO_DIR/stage2/config.json" ] || { echo "finetune_audit.sh: no stage-2 checkpoint in $DEMO_DIR/stage2" >&2; exit 2; }
[ -f "$DATA/test.json" ] || { echo "finetune_audit.sh: no prepared easy-VQA in $DATA" >&2; exit 2; }
# The template stage 2 recorded; none for a transformers-native VLM (DEMO_ARCH), which is prompted with its own chat
# template (its config has another model_type than this project's exgra_med).
CONV_MODE=${CONV_MODE-$(python -c "
import json, sys
config = json.load(open(sys.argv[1]))
print(config.get('conv_template') or ('llava_med' if config.get('model_type') == 'exgra_med' else ''))
" "$DEMO_DIR/stage2/config.json")}
TEMPLATE_FLAGS=()
[ -n "$CONV_MODE" ] && TEMPLATE_FLAGS=(--conv_template "$CONV_MODE")

# The GPU recipe, made small: no per-epoch val scoring or checkpoints, a fixed number of steps.
CPU_ARGS=(--bf16 False --activation_checkpointing False --dataloader_num_workers 0 --seed "$SEED"
          --per_device_train_batch_size "$BATCH" --max_steps "$FINETUNE_STEPS" --logging_steps 20
          --warmup_steps 10 --lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{"min_lr_rate": 0.1}'
          --eval_strategy no --save_strategy no --load_best_model_at_end False
          --evaluate_on_val False --evaluate_on_test False)

TRAIN_DATA=()
if [ -n "${FINETUNE_DATA:-}" ]; then
  [ -f "$FINETUNE_DATA" ] || { echo "finetune_audit.sh: FINETUNE_DATA=$FINETUNE_DATA not found" >&2; exit 2; }
  [ "${BALANCE_YES_NO:-0}" = 1 ] && { echo "finetune_audit.sh: set FINETUNE_DATA or BALANCE_YES_NO, not both" >&2; exit 2; }
  TRAIN_DATA=(--data_path "$FINETUNE_DATA")
elif [ "${BALANCE_YES_NO:-0}" = 1 ]; then
  mkdir -p "$OUT.data"
  [ -f "$OUT.data/train_balanced.json" ] || \
    exgra-med subsample --in "$DATA/train.json" --out "$OUT.data/train_balanced.json" --balance-yes-no --seed "$SEED"
  TRAIN_DATA=(--data_path "$OUT.data/train_balanced.json")
fi
echo "== fine-tune: $DEMO_DIR/stage2 on easy-VQA ($FINETUNE_STEPS steps of $BATCH) -> $OUT"
start=$SECONDS
if [ ! -f "$OUT/model.safetensors" ]; then
  MODEL_PATH="$DEMO_DIR/stage2" DATA_DIR="$DATA" OUTPUT_DIR="$OUT" LR="${FINETUNE_LR:-3e-3}" \
    bash scripts/finetune.sh easy-vqa "${CPU_ARGS[@]}" ${TEMPLATE_FLAGS[@]+"${TEMPLATE_FLAGS[@]}"} \
      ${TRAIN_DATA[@]+"${TRAIN_DATA[@]}"} ${FINETUNE_FLAGS:-}
fi
echo "   fine-tuning took $((SECONDS - start)) s"

QUESTIONS="$OUT/test_questions.json"
if [ "$TEST_QUESTIONS" -gt 0 ]; then
  FRACTION=$(python -c "import json,sys; n=len(json.load(open(sys.argv[1]))); print(min(1.0, $TEST_QUESTIONS / n))" "$DATA/test.json")
  exgra-med subsample --in "$DATA/test.json" --out "$QUESTIONS" --fraction "$FRACTION" --seed "$SEED"
else
  cp "$DATA/test.json" "$QUESTIONS"
fi

echo "== answers on the test questions with the real, blank, shuffled and counterfactual images (batch $EVAL_BATCH) -> $OUT/test_answers_$TEST_QUESTIONS.jsonl"
start=$SECONDS
# The tiny model has only ever seen the training template, so it answers in that format (GPU checkpoints
# use the reference's `simple` evaluation prompt, the default of generate-vqa). The grounding audit writes the
# real-image answers in generate-vqa's format (and reuses them on a rerun) and scores all three beside the
# answer-prior baselines (majority answer, question prior).
exgra-med grounding-audit --model "$OUT" --question-file "$QUESTIONS" --image-folder "$DATA/images" \
  --candidate "$DATA/candidate.json" --train "$DATA/train.json" ${CONV_MODE:+--conv-template "$CONV_MODE"} \
  --batch-size "$EVAL_BATCH" --max-new-tokens "${MAX_NEW_TOKENS:-8}" --quiet \
  --answers-file "$OUT/test_answers_$TEST_QUESTIONS.jsonl" --out "$OUT/grounding_audit.json" \
  --counterfactual "${COUNTERFACTUAL:-auto}"
echo "   answering took $((SECONDS - start)) s"
echo
echo "== reference metrics of the real-image answers -> $OUT/test_scores.json"
exgra-med score --gt "$QUESTIONS" --pred "$OUT/test_answers_$TEST_QUESTIONS.jsonl" --candidate "$DATA/candidate.json" \
  --json "$OUT/test_scores.json"
