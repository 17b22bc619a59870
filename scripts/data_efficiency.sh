#!/usr/bin/env bash
# The data-efficiency study (the paper's headline): LLaVA-Med (alignment off) vs ExGra-Med, each pre-trained on a
# seeded fraction of the stage-1 and stage-2 data, then fine-tuned and evaluated the same way.
#
#   bash scripts/data_efficiency.sh
#
# For every fraction F and seed S: a seeded `exgra-med subsample` of the stage-1 and stage-2 records, stage 1
# (projector only; it has no alignment, so both methods start from the same stage-1 projector: a paired
# comparison), then per method stage 2 (scripts/stage2.sh, `--llava-med` for the baseline), the same fine-tuning
# (scripts/finetune.sh) and the grounding audit (real / blank / shuffled images, majority and question-prior
# baselines) of both the stage-2 model (the zero-fine-tune row) and the fine-tuned model.
# One result file per cell (STUDY_DIR/cells/METHOD_fF_sS.json); finished cells are skipped, a killed stage resumes
# from its last checkpoint. At the end: RESULTS_DIR/table.md (mean +- std over seeds), cells.csv and figure.png.
# With CURVE_STEPS the fine-tuning writes a checkpoint at each of those steps (`--save_at_steps`; the last step ends
# it) and every checkpoint is audited too: the learning curve (RESULTS_DIR/curve.csv, curve.png, and its tables).
#
# Variables (all optional except the data and models):
#   MODEL_PATH, VISION_TOWER           LLM and vision tower (local folders or Hub ids)
#   STAGE1_DATA, STAGE2_DATA           pre-training records (stage 2 with conversations_long for ExGra-Med)
#   IMAGE_FOLDER                       their images
#   FT_DATA_DIR                        prepared VQA data set (train.json, val.json, test.json, candidate.json,
#                                      images/), e.g. `exgra-med prepare vqa-rad --out ...`
#   FT_NAME (vqa-rad)                  finetune.sh recipe name (vqa-rad | slake | pathvqa, or any name with FT_LR)
#   FT_LR                              fine-tuning learning rate (default: the recipe's)
#   FT_FRACTION (1.0)                  seeded share of the fine-tuning train set (few-shot budget)
#   TEST_QUESTIONS (0 = all)           seeded subset of test.json, the same for every cell
#   METHODS ("llava_med exgra_med"), FRACTIONS ("10 40 100"), SEEDS ("0 1 2"); besides the two methods:
#     exgra_med_a<alpha> (e.g. exgra_med_a0.25: ExGra-Med with that alignment weight) and llava_med_matched
#     (LLaVA-Med given ExGra-Med's stage-2 training time: its steps scaled by the ratio of the two runs' train_runtime;
#     needs llava_med and exgra_med of the same fraction and seed before it in METHODS)
#   STAGE2_EPOCHS ("" = the recipe's)  stage-2 epochs per fraction, e.g. "10:10 40:2.5 100:1" (every fraction then
#                                      trains as many steps as the whole set does in one epoch)
#   CURVE_STEPS ("")                   fine-tuning steps to audit, e.g. "25 50 100 200 400 800" (the last ends the
#                                      run; the checkpoints are all kept: --save_total_limit 0)
#   STUDY_DIR (runs/data_efficiency), RESULTS_DIR (STUDY_DIR/results)
#   STAGE1_ARGS, STAGE2_ARGS, FINETUNE_ARGS, EVAL_ARGS   extra flags for each step (word-split)
#   CONV_MODE (llava_med), EVAL_BATCH (16), plus the launcher variables of _launch.sh (NPROC_PER_NODE,
#   NNODES, DEEPSPEED, FSDP, ...): GPU nodes run the same script with their checkpoints and data.
# Wrappers with the reference's names: scripts/train_exgra_10percent.sh, scripts/train_llava_10percent.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${MODEL_PATH:?set MODEL_PATH to the LLM (local folder or Hub id)}"
: "${VISION_TOWER:?set VISION_TOWER to the vision tower}"
: "${STAGE1_DATA:?set STAGE1_DATA to the stage-1 records}"
: "${STAGE2_DATA:?set STAGE2_DATA to the stage-2 records}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the pre-training images}"
: "${FT_DATA_DIR:?set FT_DATA_DIR to a prepared VQA data set (train/val/test.json + images/)}"
STUDY_DIR=${STUDY_DIR:-runs/data_efficiency}
RESULTS_DIR=${RESULTS_DIR:-$STUDY_DIR/results}
METHODS=${METHODS:-llava_med exgra_med}
FRACTIONS=${FRACTIONS:-10 40 100}
SEEDS=${SEEDS:-0 1 2}
FT_NAME=${FT_NAME:-vqa-rad}
FT_FRACTION=${FT_FRACTION:-1.0}
TEST_QUESTIONS=${TEST_QUESTIONS:-0}
CONV_MODE=${CONV_MODE:-llava_med}
EVAL_BATCH=${EVAL_BATCH:-16}
read -r -d "" -a STAGE1_EXTRA <<< "${STAGE1_ARGS:-}" || true
read -r -d "" -a STAGE2_EXTRA <<< "${STAGE2_ARGS:-}" || true
read -r -d "" -a FINETUNE_EXTRA <<< "${FINETUNE_ARGS:-}" || true
read -r -d "" -a EVAL_EXTRA <<< "${EVAL_ARGS:-}" || true
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

for m in $METHODS; do
  [[ "$m" =~ ^(llava_med|llava_med_matched|exgra_med|exgra_med_a[0-9]+(\.[0-9]+)?)$ ]] || {
    echo "data_efficiency.sh: METHODS: unknown method $m (llava_med, llava_med_matched, exgra_med, exgra_med_a<alpha>)" >&2
    exit 2; }
done
read -r -a CURVE <<< "${CURVE_STEPS:-}"
for s in ${CURVE[@]+"${CURVE[@]}"}; do
  [[ "$s" =~ ^[1-9][0-9]*$ ]] || { echo "data_efficiency.sh: CURVE_STEPS: $s is not a step number" >&2; exit 2; }
done
declare -A EPOCHS=()
for item in ${STAGE2_EPOCHS:-}; do
  [[ "$item" =~ ^([0-9]+):([0-9]+(\.[0-9]+)?)$ ]] || { echo "data_efficiency.sh: STAGE2_EPOCHS: expected FRACTION:EPOCHS, got $item" >&2; exit 2; }
  EPOCHS[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
for f in $FRACTIONS; do
  [[ "$f" =~ ^[0-9]+$ && "$f" -ge 1 && "$f" -le 100 ]] || { echo "data_efficiency.sh: FRACTIONS: $f is not a percentage 1-100" >&2; exit 2; }
done
for f in "$STAGE1_DATA" "$STAGE2_DATA" "$FT_DATA_DIR/train.json" "$FT_DATA_DIR/val.json" "$FT_DATA_DIR/test.json"; do
  [ -f "$f" ] || { echo "data_efficiency.sh: $f not found" >&2; exit 2; }
done
[ -d "$IMAGE_FOLDER" ] || { echo "data_efficiency.sh: image folder $IMAGE_FOLDER not found" >&2; exit 2; }

DATA="$STUDY_DIR/data"
mkdir -p "$DATA" "$STUDY_DIR/cells"
CANDIDATE=()
[ -f "$FT_DATA_DIR/candidate.json" ] || { echo "data_efficiency.sh: $FT_DATA_DIR/candidate.json not found (written by exgra-med prepare)" >&2; exit 2; }
CANDIDATE=(--candidate "$FT_DATA_DIR/candidate.json")

# subset IN OUT FRACTION SEED: a seeded subset (the whole file at 100%); skipped when OUT exists.
subset() {
  [ -f "$2" ] && return 0
  exgra-med subsample --in "$1" --out "$2" --fraction "$3" --seed "$4"
}
# The test questions: one seeded subset shared by every cell.
QUESTIONS="$DATA/test_questions.json"
if [ "$TEST_QUESTIONS" -gt 0 ]; then
  n=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$FT_DATA_DIR/test.json")
  subset "$FT_DATA_DIR/test.json" "$QUESTIONS" "$(python -c "print(min(1.0, $TEST_QUESTIONS / $n))")" 0
else
  [ -f "$QUESTIONS" ] || cp "$FT_DATA_DIR/test.json" "$QUESTIONS"
fi

# The grounding audit (real / blank / shuffled images, the counterfactual rows where the truth is known, and the
# baselines) of each model, one process for all of a cell's models: audit LOG MODEL OUT_JSON [MODEL OUT_JSON ...]
audit() {
  local log=$1 pairs=()
  shift
  while [ $# -gt 0 ]; do pairs+=(--pair "$1" "$2"); shift 2; done
  exgra-med data-efficiency audit "${pairs[@]}" -- --question-file "$QUESTIONS" --image-folder "$FT_DATA_DIR/images" \
    "${CANDIDATE[@]}" --train "$FT_DATA_DIR/train.json" --conv-template "$CONV_MODE" --batch-size "$EVAL_BATCH" \
    --quiet "${EVAL_EXTRA[@]}" >> "$log" 2>&1 || { echo "   audit failed; see $log" >&2; exit 1; }
}
# trained_steps RUN: the optimizer steps of a finished run (its trainer_state.json).
trained_steps() {
  python -c "import json,sys; print(json.load(open(sys.argv[1]))['global_step'])" "$1/trainer_state.json"
}

total=0
for _ in $SEEDS; do for _ in $FRACTIONS; do for _ in $METHODS; do total=$((total + 1)); done; done; done
cell=0
study_start=$SECONDS
for seed in $SEEDS; do
  for fraction in $FRACTIONS; do
    share=$(python -c "print($fraction / 100)")
    run="$STUDY_DIR/f${fraction}_s${seed}"
    stage1_data="$DATA/stage1_f${fraction}_s${seed}.json"
    stage2_data="$DATA/stage2_f${fraction}_s${seed}.json"
    for method in $METHODS; do
      cell=$((cell + 1))
      result="$STUDY_DIR/cells/${method}_f${fraction}_s${seed}.json"
      label="[$cell/$total] $method, ${fraction}% of the pre-training data, seed $seed"
      if [ -f "$result" ]; then
        echo "== $label: done (skipped)"
        continue
      fi
      echo "== $label"
      subset "$STAGE1_DATA" "$stage1_data" "$share" "$seed"
      subset "$STAGE2_DATA" "$stage2_data" "$share" "$seed"

      t=$SECONDS
      if [ ! -f "$run/stage1/mm_projector.safetensors" ]; then
        echo "   stage 1 (shared by both methods) -> $run/stage1"
        DATA_PATH="$stage1_data" OUTPUT_DIR="$run/stage1" \
          bash scripts/stage1.sh --seed "$seed" --resume_from_checkpoint auto "${STAGE1_EXTRA[@]}" > "$run.stage1.log" 2>&1 \
          || { echo "   stage 1 failed; see $run.stage1.log" >&2; exit 1; }
      fi
      stage1_s=$((SECONDS - t))

      t=$SECONDS
      out="$run/$method"
      alpha=""
      case "$method" in exgra_med_a*) alpha=${method#exgra_med_a} ;; exgra_med) alpha=${ALPHA:-} ;; esac
      if [ ! -f "$out/stage2/model.safetensors" ]; then
        echo "   stage 2 -> $out/stage2"
        mkdir -p "$out"
        flag=() length=()
        [ -n "${EPOCHS[$fraction]:-}" ] && length=(--num_train_epochs "${EPOCHS[$fraction]}")
        case "$method" in
          llava_med) flag=(--llava-med) ;;
          llava_med_matched)
            for m in llava_med exgra_med; do
              [ -f "$run/$m/stage2/trainer_state.json" ] || {
                echo "   llava_med_matched needs $m's stage 2 of this fraction and seed first (METHODS order)" >&2; exit 2; }
            done
            flag=(--llava-med)
            steps=$(exgra-med data-efficiency matched-steps --baseline "$run/llava_med/stage2" \
              --target "$run/exgra_med/stage2") || exit 1
            length=(--max_steps "$steps") ;;
        esac
        ALPHA=$alpha DATA_PATH="$stage2_data" PROJECTOR="$run/stage1" OUTPUT_DIR="$out/stage2" \
          bash scripts/stage2.sh ${flag[@]+"${flag[@]}"} --seed "$seed" --resume_from_checkpoint auto \
          "${STAGE2_EXTRA[@]}" ${length[@]+"${length[@]}"} > "$out/stage2.log" 2>&1 \
          || { echo "   stage 2 failed; see $out/stage2.log" >&2; exit 1; }
      fi
      stage2_s=$((SECONDS - t))

      t=$SECONDS
      ft_data="$FT_DATA_DIR"
      if [ "$FT_FRACTION" != "1.0" ] && [ "$FT_FRACTION" != "1" ]; then
        ft_data="$DATA/finetune_s${seed}"
        mkdir -p "$ft_data"
        subset "$FT_DATA_DIR/train.json" "$ft_data/train.json" "$FT_FRACTION" "$seed"
        for f in val.json test.json; do [ -e "$ft_data/$f" ] || ln -s "$(cd "$FT_DATA_DIR" && pwd)/$f" "$ft_data/$f"; done
      fi
      curve_flags=() models=("$out/stage2" "$out/audit_stage2.json") curve=()
      if [ ${#CURVE[@]} -gt 0 ]; then
        curve_flags=(--max_steps "${CURVE[-1]}" --save_total_limit 0)
        [ ${#CURVE[@]} -gt 1 ] && curve_flags+=(--save_at_steps "${CURVE[@]:0:${#CURVE[@]}-1}")
        for s in "${CURVE[@]:0:${#CURVE[@]}-1}"; do
          models+=("$out/finetune/checkpoint-$s" "$out/audit_finetune_$s.json")
          curve+=("$s=$out/audit_finetune_$s.json")
        done
        curve+=("${CURVE[-1]}=$out/audit_finetune.json")
      fi
      models+=("$out/finetune" "$out/audit_finetune.json")
      if [ ! -f "$out/finetune/model.safetensors" ]; then
        echo "   fine-tuning ($FT_NAME) -> $out/finetune"
        MODEL_PATH="$out/stage2" DATA_DIR="$ft_data" IMAGE_FOLDER="$FT_DATA_DIR/images" OUTPUT_DIR="$out/finetune" \
          LR="${FT_LR:-${LR:-}}" bash scripts/finetune.sh "$FT_NAME" --seed "$seed" --resume_from_checkpoint auto \
          "${FINETUNE_EXTRA[@]}" ${curve_flags[@]+"${curve_flags[@]}"} > "$out/finetune.log" 2>&1 \
          || { echo "   fine-tuning failed; see $out/finetune.log" >&2; exit 1; }
      fi
      # the run is complete: its checkpoints stay as models to audit, their optimizer states (2x the weights) go
      rm -f "$out"/finetune/checkpoint-*/optimizer.pt
      finetune_s=$((SECONDS - t))

      t=$SECONDS
      echo "   grounding audit of the stage-2 model and the fine-tuned model$([ ${#curve[@]} -gt 1 ] && echo "'s checkpoints")"
      audit "$out/audit.log" "${models[@]}"
      eval_s=$((SECONDS - t))

      exgra-med data-efficiency record --out "$result" --method "$method" --fraction "$fraction" --seed "$seed" \
        --finetune-audit "$out/audit_finetune.json" --stage2-audit "$out/audit_stage2.json" \
        --curve ${curve[@]+"${curve[@]}"} --questions "$QUESTIONS" \
        --seconds "stage1=$stage1_s" "stage2=$stage2_s" "finetune=$finetune_s" "eval=$eval_s" \
        --setting "model=$MODEL_PATH" "vision_tower=$VISION_TOWER" "stage1_data=$STAGE1_DATA" \
        "stage2_data=$STAGE2_DATA" "finetune=$FT_NAME:$FT_DATA_DIR:$FT_FRACTION" \
        "stage1_args=${STAGE1_ARGS:-}" "stage2_args=${STAGE2_ARGS:-}" "finetune_args=${FINETUNE_ARGS:-}" \
        "stage2_steps=$(trained_steps "$out/stage2")" "stage2_epochs=${EPOCHS[$fraction]:-recipe}" \
        "curve_steps=${CURVE_STEPS:-}" "alpha=$alpha" "ft_lr=${FT_LR:-${LR:-}}"
      echo "   cell done in $((stage1_s + stage2_s + finetune_s + eval_s)) s (study: $((SECONDS - study_start)) s so far)"
    done
  done
done

exgra-med data-efficiency summarize --cells "$STUDY_DIR/cells" --out "$RESULTS_DIR"
