#!/usr/bin/env bash
# End-to-end demo on this machine's CPU, fully offline: a tiny random model + the easy-VQA data set
# (shipped on PyPI): the tiny CLIP tower pre-trained contrastively on the demo's own captions (real users start
# from a pretrained CLIP), then stage 1 and stage 2 (ExGra-Med alignment on), using the same scripts as GPU runs.
#
#   bash examples/easy_vqa/demo.sh            (make demo runs this inside .venv)
# Variables: DEMO_DIR (default runs/demo), TOWER_STEPS, STAGE1_STEPS, STAGE2_STEPS, FINETUNE_STEPS, BATCH, STAGE2_BATCH,
# DEMO_IMAGES, SEED, VISION_FLAGS, TEMPLATE, RATIONALE, FINETUNE_LR. Finished stages are skipped on a rerun (and a
# killed stage resumes from its checkpoint).
#   VISION_FLAGS= TEMPLATE=llava_med RATIONALE=0 FINETUNE_LR=3e-3 FINETUNE_STEPS=600 TOWER_STEPS=600 STAGE1_STEPS=300
#   STAGE2_STEPS=400:
#   the reference's connector (64 patch tokens), template and fine-tuning data, as the demo was before (the README's
#   demo section has what each reaches).
#   DEMO_ARCH=qwen2_5_vl|gemma3|llava_onevision: the same demo on a transformers-native VLM (native_vlm.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the repository root: scripts/ and `python -m examples...` run from there
if [ -n "${DEMO_ARCH:-}" ] && [ "$DEMO_ARCH" != llava ]; then
  exec bash examples/easy_vqa/native_vlm.sh
fi

DEMO_DIR=${DEMO_DIR:-runs/demo}
TOWER_STEPS=${TOWER_STEPS:-800}
STAGE1_STEPS=${STAGE1_STEPS:-100}
STAGE2_STEPS=${STAGE2_STEPS:-300}
BATCH=${BATCH:-32}                 # stage 1 and fine-tuning
STAGE2_BATCH=${STAGE2_BATCH:-16}   # the alignment's graph matching grows with the batch; 16 keeps the demo short
FINETUNE_STEPS=${FINETUNE_STEPS:-1500}
DEMO_IMAGES=${DEMO_IMAGES:-4000}
SEED=${SEED:-0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NPROC_PER_NODE=${NPROC_PER_NODE:-1} MASTER_PORT=${MASTER_PORT:-29511}

# VISION_FLAGS: connector flags of stages 1 and 2. Default: one image token, the CLS token of the tower's last layer
# (the feature its contrastive pre-training trains), in a short context; set it empty for the reference's connector
# (64 patch tokens of the penultimate layer). TEMPLATE: the prompt template of stage 2, fine-tuning and evaluation
# (default mistral, whose prompt is short; the reference's is llava_med). RATIONALE=1 (default) fine-tunes on
# data/train_rationale.json (examples/easy_vqa/rationale.py: yes/no balanced and answered with the comparison in
# words, "red blue different absent yes"); RATIONALE=0 on train.json as the reference.
read -r -a VISION_ARGS <<< "${VISION_FLAGS---mm_vision_select_layer -1 --mm_vision_select_feature cls}"
TEMPLATE=${TEMPLATE:-mistral}
RATIONALE=${RATIONALE:-1}

CPU_ARGS=(--bf16 False --activation_checkpointing False --dataloader_num_workers 0 --seed "$SEED"
          --gradient_accumulation_steps 1 --logging_steps 25
          --save_steps 200 --warmup_steps 20 --lr_scheduler_type cosine_with_min_lr
          --lr_scheduler_kwargs '{"min_lr_rate": 0.1}' --max_grad_norm 1.0 --resume_from_checkpoint auto)

echo "== 1/6 tiny model (offline; CLIP tower 32 px, patch 4: a CLS token and 64 patch tokens) -> $DEMO_DIR/tiny"
[ -f "$DEMO_DIR/tiny/config.json" ] || exgra-med make-tiny-model --out "$DEMO_DIR/tiny" --image-size 32 --patch-size 4 --seed "$SEED"

echo "== 2/6 easy-VQA data -> $DEMO_DIR/data"
[ -f "$DEMO_DIR/data/candidate.json" ] || exgra-med prepare easy-vqa --out "$DEMO_DIR/data" \
  --max-images "$DEMO_IMAGES" --seed "$SEED"
[ -f "$DEMO_DIR/data/train_rationale.json" ] || python -m examples.easy_vqa.rationale \
  --in "$DEMO_DIR/data/train.json" --out "$DEMO_DIR/data/train_rationale.json" --seed "$SEED"

echo "== 3/6 vision tower: contrastive (CLIP) pre-training on the demo's image-caption pairs ($TOWER_STEPS steps)"
[ -f "$DEMO_DIR/tower/config.json" ] || python -m examples.easy_vqa.tower --tower "$DEMO_DIR/tiny/vision" --tokenizer "$DEMO_DIR/tiny/llm" \
  --data "$DEMO_DIR/data/alignment.json" --image-folder "$DEMO_DIR/data/images" --out "$DEMO_DIR/tower" \
  --steps "$TOWER_STEPS" --seed "$SEED"

export MODEL_PATH="$DEMO_DIR/tiny/llm" VISION_TOWER="$DEMO_DIR/tower" IMAGE_FOLDER="$DEMO_DIR/data/images"

echo "== 4/6 stage 1: projector only ($STAGE1_STEPS steps)"
[ -f "$DEMO_DIR/stage1/mm_projector.safetensors" ] || DATA_PATH="$DEMO_DIR/data/alignment.json" OUTPUT_DIR="$DEMO_DIR/stage1" \
  bash scripts/stage1.sh "${CPU_ARGS[@]}" ${VISION_ARGS[@]+"${VISION_ARGS[@]}"} --per_device_train_batch_size "$BATCH" \
  --max_steps "$STAGE1_STEPS" --learning_rate 3e-3

echo "== 5/6 stage 2: projector + LLM with the ExGra-Med alignment ($STAGE2_STEPS steps)"
[ -f "$DEMO_DIR/stage2/model.safetensors" ] || \
  DATA_PATH="$DEMO_DIR/data/instruct.json" PROJECTOR="$DEMO_DIR/stage1" OUTPUT_DIR="$DEMO_DIR/stage2" \
  bash scripts/stage2.sh ${DEMO_STAGE2_FLAGS:-} "${CPU_ARGS[@]}" ${VISION_ARGS[@]+"${VISION_ARGS[@]}"} --conv_template "$TEMPLATE" \
  --per_device_train_batch_size "$STAGE2_BATCH" --max_steps "$STAGE2_STEPS" --learning_rate 3e-3

echo "   reload the stage-2 checkpoint and answer three test questions:"
python - "$DEMO_DIR/data/test.json" "$DEMO_DIR/stage2/sample_questions.json" <<'PY'
import json, sys
json.dump(json.load(open(sys.argv[1]))[:3], open(sys.argv[2], "w"))
PY
exgra-med generate-vqa --model "$DEMO_DIR/stage2" --question-file "$DEMO_DIR/stage2/sample_questions.json" \
  --image-folder "$DEMO_DIR/data/images" --answers-file "$DEMO_DIR/stage2/sample_answers.jsonl" \
  --conv-template "$TEMPLATE" --max-new-tokens 8 --quiet
python - "$DEMO_DIR/stage2/sample_questions.json" "$DEMO_DIR/stage2/sample_answers.jsonl" <<'PY'
import json, sys
questions = {str(r["id"]): r for r in json.load(open(sys.argv[1]))}
for line in open(sys.argv[2]):
    a = json.loads(line)
    q = questions[str(a["question_id"])]
    print(f"   {q['image']}: {q['conversations'][0]['value'].splitlines()[0]!r} -> {a['text']!r} "
          f"(truth {q['conversations'][1]['value']!r})")
PY

echo "== 6/6 fine-tune on easy-VQA, answer the test questions, score against baselines"
if [ "$RATIONALE" = 1 ]; then
  export FINETUNE_DATA=${FINETUNE_DATA:-$DEMO_DIR/data/train_rationale.json} MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
fi
DEMO_DIR="$DEMO_DIR" BATCH="$BATCH" SEED="$SEED" FINETUNE_STEPS="$FINETUNE_STEPS" FINETUNE_LR="${FINETUNE_LR:-1.5e-3}" \
  bash examples/easy_vqa/finetune_audit.sh

echo
echo "stage-1 projector   : $DEMO_DIR/stage1/mm_projector.safetensors"
echo "stage-2 checkpoint  : $DEMO_DIR/stage2"
echo "fine-tuned VQA model: $DEMO_DIR/finetune"
echo "demo took $SECONDS s (stages finished by an earlier run are skipped)"
