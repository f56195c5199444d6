#!/usr/bin/env bash
# PACT on Qwen2-VL-7B-Instruct over the paper's 12 benchmarks, at the paper's operating point for
# this model (reduction before layer 4, EUTI keeps 80 %, DBDPC cutoff 0.1, retrieval alpha 1.5),
# plus the no-reduction reference of every task.
#
#   bash scripts/pact_qwen2-vl-7b.sh
#   MODEL=/ckpt/qwen2-vl TASKS=textvqa_val,chartqa OUTPUT=runs/qwen bash scripts/pact_qwen2-vl-7b.sh
#
# Environment:
#   MODEL   checkpoint (default Qwen/Qwen2-VL-7B-Instruct)
#   TASKS   lmms-eval tasks (default: the 12 below; egoschema needs the videos and produces a
#           server submission; mmbench_en_dev may call GPT for unparsable answers)
#   OUTPUT  output folder (default runs/pact_qwen2-vl-7b)
#   KEEP_RATIO (0.8), CUTOFF (0.1): the PACT point
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN).
# Tiny local smoke test:
#   MODEL=/tmp/tiny_qwen TASKS=pact_tiny_vqa INCLUDE_PATH=tests/eval_tasks MODEL_ARGS=layer=2,dtype=float32 \
#       bash scripts/pact_qwen2-vl-7b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-Qwen/Qwen2-VL-7B-Instruct}
TASKS=${TASKS:-$PAPER_QWEN_TASKS}
OUTPUT=${OUTPUT:-runs/pact_qwen2-vl-7b}
KEEP_RATIO=${KEEP_RATIO:-0.8}
CUTOFF=${CUTOFF:-0.1}
LOAD="pretrained=$MODEL,dtype=bfloat16,attn_implementation=sdpa"

for task in $(task_list "$TASKS"); do
    run_eval pact_qwen2_vl "$LOAD,pact_config=pact,keep_ratio=$KEEP_RATIO,cutoff=$CUTOFF" \
        "$task" "$OUTPUT/pact" "pact_$task"
    run_baseline pact_qwen2_vl "$LOAD" "$task" "$OUTPUT"
done
finish "$OUTPUT"
