#!/usr/bin/env bash
# PACT on Gemma 3 4B (google/gemma-3-4b-it) over the image benchmarks of the paper's
# LLaVA-OneVision list (Gemma 3 takes no video, so videomme, mlvu_dev, perceptiontest_test_mc and
# egoschema are left out: 12 tasks), at the paper's LLaVA-OneVision operating point (reduction before
# layer 4, EUTI keeps 55 %, DBDPC cutoff 0.21, retrieval alpha 1.5), plus the no-reduction reference
# of every task. The paper has no Gemma 3 point; calibrate (`pact calibrate`) or sweep for a better
# one. Layer 4 of Gemma 3 is a sliding-window layer (five sliding layers, then a global one); the
# reduced image tokens keep the stock pattern (windows over original positions, each image's tokens
# attending to each other), see docs/CONFIGDOC.md "Gemma 3".
#
#   bash scripts/pact_gemma3-4b.sh
#   MODEL=google/gemma-3-12b-it OUTPUT=runs/gemma3-12b bash scripts/pact_gemma3-4b.sh
#   PAN_AND_SCAN=1 TASKS=docvqa_val,infovqa_val bash scripts/pact_gemma3-4b.sh
#
# Environment:
#   MODEL   checkpoint (default google/gemma-3-4b-it; 12B and 27B load the same way)
#   TASKS   lmms-eval tasks (default: the 12 image tasks below; mmbench_en_dev may call GPT for
#           unparsable answers)
#   OUTPUT  output folder (default runs/pact_gemma3-4b)
#   KEEP_RATIO (0.55), CUTOFF (0.21): the PACT point
#   PAN_AND_SCAN  1: Gemma 3's pan-and-scan crops of non-square images, in both runs (default 0, as
#           the released processor configs)
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN). FlashAttention cannot take Gemma 3's masks on a reduced
#   sequence: keep attn_implementation=sdpa (or eager).
# Tiny local smoke test:
#   MODEL=/tmp/tiny_gemma3 TASKS=pact_tiny_vqa INCLUDE_PATH=tests/eval_tasks MODEL_ARGS=layer=2,dtype=float32 \
#       bash scripts/pact_gemma3-4b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

VIDEO_TASKS=" videomme mlvu_dev perceptiontest_test_mc egoschema "
IMAGE_TASKS=""
for task in $PAPER_OV_TASKS; do
    [[ "$VIDEO_TASKS" == *" $task "* ]] || IMAGE_TASKS+="${IMAGE_TASKS:+ }$task"
done

MODEL=${MODEL:-google/gemma-3-4b-it}
TASKS=${TASKS:-$IMAGE_TASKS}
OUTPUT=${OUTPUT:-runs/pact_gemma3-4b}
KEEP_RATIO=${KEEP_RATIO:-0.55}
CUTOFF=${CUTOFF:-0.21}
PAN_AND_SCAN=${PAN_AND_SCAN:-0}
LOAD="pretrained=$MODEL,dtype=bfloat16,attn_implementation=sdpa"
case "$PAN_AND_SCAN" in
    0) ;;
    1) LOAD+=",do_pan_and_scan=true" ;;
    *) echo "PAN_AND_SCAN=$PAN_AND_SCAN: expected 0 or 1" >&2; exit 2 ;;
esac

for task in $(task_list "$TASKS"); do
    run_eval pact_gemma3 "$LOAD,pact_config=pact,keep_ratio=$KEEP_RATIO,cutoff=$CUTOFF" \
        "$task" "$OUTPUT/pact" "pact_$task"
    run_baseline pact_gemma3 "$LOAD" "$task" "$OUTPUT"
done
finish "$OUTPUT"
