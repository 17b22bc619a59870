#!/usr/bin/env bash
# End-to-end demo on this machine's CPU, fully offline: a tiny random model + the easy-VQA data set
# (shipped on PyPI) through stage 1 and stage 2 (ExGra-Med alignment on), using the same scripts as GPU runs.
#
#   bash scripts/demo.sh            (make demo runs this inside .venv)
# Variables: DEMO_DIR (default runs/demo), STAGE1_STEPS, STAGE2_STEPS, BATCH, DEMO_IMAGES, SEED.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEMO_DIR=${DEMO_DIR:-runs/demo}
STAGE1_STEPS=${STAGE1_STEPS:-300}
STAGE2_STEPS=${STAGE2_STEPS:-600}
BATCH=${BATCH:-32}
DEMO_IMAGES=${DEMO_IMAGES:-2000}
SEED=${SEED:-0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NPROC_PER_NODE=${NPROC_PER_NODE:-1} MASTER_PORT=${MASTER_PORT:-29511}

CPU_ARGS=(--bf16 False --gradient_checkpointing False --dataloader_num_workers 0 --seed "$SEED"
          --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1 --logging_steps 25
          --save_steps 200 --warmup_steps 20 --lr_scheduler_type cosine_with_min_lr
          --lr_scheduler_kwargs '{"min_lr_rate": 0.1}' --max_grad_norm 1.0 --resume_from_checkpoint auto)

echo "== 1/5 tiny model (offline) -> $DEMO_DIR/tiny"
[ -f "$DEMO_DIR/tiny/config.json" ] || exgra-med make-tiny-model --out "$DEMO_DIR/tiny" --seed "$SEED"

echo "== 2/5 easy-VQA data -> $DEMO_DIR/data"
[ -f "$DEMO_DIR/data/test.json" ] || exgra-med prepare easy-vqa --out "$DEMO_DIR/data" --max-images "$DEMO_IMAGES" --seed "$SEED"

export MODEL_PATH="$DEMO_DIR/tiny/llm" VISION_TOWER="$DEMO_DIR/tiny/vision" IMAGE_FOLDER="$DEMO_DIR/data/images"

echo "== 3/5 stage 1: projector only ($STAGE1_STEPS steps)"
DATA_PATH="$DEMO_DIR/data/alignment.json" OUTPUT_DIR="$DEMO_DIR/stage1" \
  bash scripts/stage1.sh "${CPU_ARGS[@]}" --max_steps "$STAGE1_STEPS" --learning_rate 3e-3

echo "== 4/5 stage 2: projector + LLM with the ExGra-Med alignment ($STAGE2_STEPS steps)"
DATA_PATH="$DEMO_DIR/data/instruct.json" PROJECTOR="$DEMO_DIR/stage1" OUTPUT_DIR="$DEMO_DIR/stage2" \
  bash scripts/stage2.sh ${DEMO_STAGE2_FLAGS:-} "${CPU_ARGS[@]}" --max_steps "$STAGE2_STEPS" --learning_rate 3e-3

echo "== 5/5 fine-tune on easy-VQA, answer the test questions, score against baselines"
DEMO_DIR="$DEMO_DIR" BATCH="$BATCH" SEED="$SEED" bash scripts/demo_finetune.sh

echo
echo "stage-1 projector   : $DEMO_DIR/stage1/mm_projector.safetensors"
echo "stage-2 checkpoint  : $DEMO_DIR/stage2"
echo "fine-tuned VQA model: $DEMO_DIR/finetune"
