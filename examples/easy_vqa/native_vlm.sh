#!/usr/bin/env bash
# The demo on a transformers-native VLM (`DEMO_ARCH=qwen2_5_vl make demo`, or gemma3 / llava_onevision), on this
# machine's CPU, fully offline: a tiny random model of that architecture in its own format (processor, chat
# template), easy-VQA, stage 2 with the ExGra-Med alignment head, fine-tuning, answers, scores, grounding audit.
# The stage-2 and fine-tuned folders load with transformers' AutoModelForImageTextToText / AutoProcessor as they are.
#
#   DEMO_ARCH=qwen2_5_vl bash examples/easy_vqa/native_vlm.sh
# Variables: DEMO_ARCH, DEMO_DIR (default runs/demo_$DEMO_ARCH), STAGE2_STEPS, FINETUNE_STEPS, STAGE2_BATCH, BATCH,
# DEMO_IMAGES, TEST_QUESTIONS, SEED. Finished stages are skipped on a rerun.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the repository root

DEMO_ARCH=${DEMO_ARCH:?set DEMO_ARCH to qwen2_5_vl, gemma3 or llava_onevision}
DEMO_DIR=${DEMO_DIR:-runs/demo_$DEMO_ARCH}
STAGE2_STEPS=${STAGE2_STEPS:-300}
FINETUNE_STEPS=${FINETUNE_STEPS:-400}
STAGE2_BATCH=${STAGE2_BATCH:-16}
BATCH=${BATCH:-32}
DEMO_IMAGES=${DEMO_IMAGES:-4000}
TEST_QUESTIONS=${TEST_QUESTIONS:-300}
SEED=${SEED:-0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NPROC_PER_NODE=${NPROC_PER_NODE:-1} MASTER_PORT=${MASTER_PORT:-29521}
DATA="$DEMO_DIR/data"

CPU_ARGS=(--bf16 False --activation_checkpointing False --dataloader_num_workers 0 --seed "$SEED"
          --logging_steps 25 --save_steps 200 --warmup_steps 20 --lr_scheduler_type cosine_with_min_lr
          --lr_scheduler_kwargs '{"min_lr_rate": 0.1}' --max_grad_norm 1.0 --resume_from_checkpoint auto)

echo "== 1/5 tiny $DEMO_ARCH model (offline, native format with processor and chat template) -> $DEMO_DIR/tiny"
[ -f "$DEMO_DIR/tiny/config.json" ] || exgra-med make-tiny-model --arch "$DEMO_ARCH" --out "$DEMO_DIR/tiny" --seed "$SEED"

echo "== 2/5 easy-VQA data -> $DATA"
[ -f "$DATA/test.json" ] || exgra-med prepare easy-vqa --out "$DATA" --max-images "$DEMO_IMAGES" --seed "$SEED"

export IMAGE_FOLDER="$DATA/images"
echo "== 3/5 stage 2: LLM + projector with the ExGra-Med alignment head ($STAGE2_STEPS steps of $STAGE2_BATCH)"
[ -f "$DEMO_DIR/stage2/model.safetensors" ] || \
  MODEL_PATH="$DEMO_DIR/tiny" DATA_PATH="$DATA/instruct.json" OUTPUT_DIR="$DEMO_DIR/stage2" \
  bash scripts/stage2_vlm.sh "${CPU_ARGS[@]}" --per_device_train_batch_size "$STAGE2_BATCH" \
  --max_steps "$STAGE2_STEPS" --learning_rate 3e-3

echo "== 4/5 fine-tune on easy-VQA ($FINETUNE_STEPS steps of $BATCH, no alignment)"
[ -f "$DEMO_DIR/finetune/model.safetensors" ] || \
  MODEL_PATH="$DEMO_DIR/stage2" DATA_PATH="$DATA/train.json" OUTPUT_DIR="$DEMO_DIR/finetune" \
  bash scripts/stage2_vlm.sh --no-alignment "${CPU_ARGS[@]}" --per_device_train_batch_size "$BATCH" \
  --max_steps "$FINETUNE_STEPS" --learning_rate 3e-3

echo "== 5/5 grounding audit on $TEST_QUESTIONS test questions (real, blank, shuffled images; baselines), scores"
OUT="$DEMO_DIR/finetune"
QUESTIONS="$OUT/test_questions.json"
FRACTION=$(python -c "import json,sys; n=len(json.load(open(sys.argv[1]))); print(min(1.0, $TEST_QUESTIONS / n))" "$DATA/test.json")
exgra-med subsample --in "$DATA/test.json" --out "$QUESTIONS" --fraction "$FRACTION" --seed "$SEED"
exgra-med grounding-audit --model "$OUT" --question-file "$QUESTIONS" --image-folder "$DATA/images" \
  --candidate "$DATA/candidate.json" --train "$DATA/train.json" --batch-size 16 --max-new-tokens 8 --quiet \
  --answers-file "$OUT/test_answers.jsonl" --out "$OUT/grounding_audit.json"
echo
exgra-med score --gt "$QUESTIONS" --pred "$OUT/test_answers.jsonl" --candidate "$DATA/candidate.json" \
  --json "$OUT/test_scores.json"
echo
echo "stage-2 checkpoint  : $DEMO_DIR/stage2 (+ exgra_med_alignment.safetensors, the alignment head)"
echo "fine-tuned VQA model: $DEMO_DIR/finetune (AutoModelForImageTextToText.from_pretrained loads it as $DEMO_ARCH)"
