#!/usr/bin/env bash
# The training and evaluation scripts on one CUDA GPU, end to end, with a tiny model in bf16:
# stage 1 (DDP), stage 2 with the ExGra-Med alignment under FSDP, stage 2 again under plain DDP, then batched
# answers in bf16 from the stage-2 checkpoint, scored. Checks that the GPU paths run (bf16 autocast, the solver on
# CUDA, FSDP with a CUDA device); it measures nothing that the benchmarks do not.
#
#   bash benchmarks/gpu_smoke.sh WORK_DIR [STEPS]
# PARTS (default "ddp fsdp deepspeed generate") picks the runs; stage 1 (DDP) always runs first.
# WORK_DIR needs tiny/ (exgra-med make-tiny-model) and data/ (exgra-med prepare easy-vqa); outputs go to WORK_DIR/runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${1:?usage: gpu_smoke.sh WORK_DIR [STEPS]}
STEPS=${2:-30}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NPROC_PER_NODE=${NPROC_PER_NODE:-1}
export MODEL_PATH="$WORK/tiny/llm" VISION_TOWER="$WORK/tiny/vision" IMAGE_FOLDER="$WORK/data/images"
RUNS="$WORK/runs"
PARTS=${PARTS:-ddp fsdp deepspeed generate}
want() { [[ " $PARTS " == *" $1 "* ]]; }
COMMON=(--max_steps "$STEPS" --per_device_train_batch_size 16 --dataloader_num_workers 2 --logging_steps 5
        --save_steps 1000 --seed 0)

echo "== stage 1 (bf16, DDP launcher)"
DATA_PATH="$WORK/data/alignment.json" OUTPUT_DIR="$RUNS/stage1" MASTER_PORT=29601 \
  bash scripts/stage1.sh "${COMMON[@]}" --learning_rate 1e-3
test -f "$RUNS/stage1/mm_projector.safetensors"

if want fsdp; then
echo "== stage 2 with alignment (bf16, FSDP full_shard)"
DATA_PATH="$WORK/data/instruct.json" PROJECTOR="$RUNS/stage1" OUTPUT_DIR="$RUNS/stage2_fsdp" MASTER_PORT=29602 \
  FSDP="full_shard auto_wrap" bash scripts/stage2.sh "${COMMON[@]}" --learning_rate 1e-4
test -f "$RUNS/stage2_fsdp/config.json"
fi

if want ddp || want generate; then
echo "== stage 2 with alignment (bf16, DDP)"
DATA_PATH="$WORK/data/instruct.json" PROJECTOR="$RUNS/stage1" OUTPUT_DIR="$RUNS/stage2" MASTER_PORT=29603 \
  bash scripts/stage2.sh "${COMMON[@]}" --learning_rate 1e-4
python - "$RUNS/stage2/trainer_state.json" <<'PY'
import json, sys
logs = json.load(open(sys.argv[1]))["log_history"]
rows = [r for r in logs if "align_loss" in r]
assert rows, "no align_loss in the log history"
print("   logged:", [(r["step"], round(r["lm_loss"], 3), round(r["align_loss"], 3)) for r in rows])
PY
fi

if want deepspeed && python -c "import deepspeed" 2>/dev/null; then
  echo "== stage 1 under DeepSpeed ZeRO-2, stage 2 with alignment under ZeRO-3 (bf16)"
  DATA_PATH="$WORK/data/alignment.json" OUTPUT_DIR="$RUNS/stage1_zero2" MASTER_PORT=29604 \
    DEEPSPEED=scripts/deepspeed/zero2.json bash scripts/stage1.sh "${COMMON[@]}" --learning_rate 1e-3
  test -f "$RUNS/stage1_zero2/mm_projector.safetensors"
  DATA_PATH="$WORK/data/instruct.json" PROJECTOR="$RUNS/stage1_zero2" OUTPUT_DIR="$RUNS/stage2_zero3" MASTER_PORT=29605 \
    DEEPSPEED=scripts/deepspeed/zero3.json bash scripts/stage2.sh "${COMMON[@]}" --learning_rate 1e-4
  test -f "$RUNS/stage2_zero3/model.safetensors"
  grep -q align_loss "$RUNS/stage2_zero3/trainer_state.json"
  echo "== stage 2 with alignment + LoRA under ZeRO-3 (bf16): adapters merged into a plain checkpoint"
  DATA_PATH="$WORK/data/instruct.json" PROJECTOR="$RUNS/stage1_zero2" OUTPUT_DIR="$RUNS/stage2_lora_zero3" \
    MASTER_PORT=29606 DEEPSPEED=scripts/deepspeed/zero3.json bash scripts/stage2.sh "${COMMON[@]}" \
    --learning_rate 1e-4 --lora_enable True --lora_r 8 --lora_alpha 16
  python - "$RUNS/stage2_lora_zero3" <<'PY'
import json, sys
from safetensors import safe_open
with safe_open(f"{sys.argv[1]}/model.safetensors", "pt") as f:
    assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k], "adapters left unmerged"
assert json.load(open(f"{sys.argv[1]}/config.json"))["lora_alpha"] is None
print("   LoRA adapters merged")
PY
else
  echo "== DeepSpeed not installed: ZeRO runs skipped"
fi

if want generate; then
echo "== answers in bf16 on the GPU, batch 16 (256 test questions)"
python -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:256], open(sys.argv[2], 'w'))" \
  "$WORK/data/test.json" "$RUNS/test256.json"
python -m exgra_med.cli generate-vqa --model "$RUNS/stage2" --question-file "$RUNS/test256.json" \
  --image-folder "$IMAGE_FOLDER" --answers-file "$RUNS/answers.jsonl" --conv-template llava_med --max-new-tokens 8 \
  --device cuda --dtype bfloat16 --batch-size 16 --quiet
python -m exgra_med.cli score --gt "$RUNS/test256.json" --pred "$RUNS/answers.jsonl" --candidate "$WORK/data/candidate.json"
fi
echo "gpu smoke: OK"
