#!/usr/bin/env bash
# The reference's name for one arm of the data-efficiency study: LLaVA-Med (the alignment off) pre-trained on 10% of the
# stage-1 and stage-2 data, then fine-tuned and evaluated, for every seed in SEEDS. A thin wrapper of
# scripts/data_efficiency.sh: the same variables (MODEL_PATH, VISION_TOWER, STAGE1_DATA, STAGE2_DATA, ...) apply.
set -euo pipefail
METHODS=llava_med FRACTIONS=10 exec bash "$(dirname "${BASH_SOURCE[0]}")/data_efficiency.sh" "$@"
