#!/usr/bin/env bash
# PACT on Qwen3-VL-8B-Instruct over the paper's 12 benchmarks (the task list of the paper's
# Qwen2-VL-7B runs), at the paper's Qwen2-VL operating point (reduction before layer 4, EUTI keeps
# 80 %, DBDPC cutoff 0.1, retrieval alpha 1.5), plus the no-reduction reference of every task.
# The paper has no Qwen3-VL point; the Qwen2-VL one is kept until `pact calibrate` or a sweep gives
# a better one. Layer 4 comes after Qwen3-VL's three DeepStack injections (after layers 0, 1, 2),
# so PACT reads keys whose visual tokens already received every injected feature.
#
#   bash scripts/pact_qwen3-vl-8b.sh
#   MODEL=/ckpt/qwen3-vl TASKS=textvqa_val,chartqa OUTPUT=runs/qwen3 bash scripts/pact_qwen3-vl-8b.sh
#
# Environment:
#   MODEL   checkpoint (default Qwen/Qwen3-VL-8B-Instruct; the MoE checkpoints, e.g.
#           Qwen/Qwen3-VL-30B-A3B-Instruct, need LMMS_MODEL=pact_qwen3_vl_moe)
#   LMMS_MODEL  lmms-eval model (default pact_qwen3_vl)
#   TASKS   lmms-eval tasks (default: the 12 below; egoschema needs the videos and produces a
#           server submission; mmbench_en_dev may call GPT for unparsable answers)
#   OUTPUT  output folder (default runs/pact_qwen3-vl-8b)
#   KEEP_RATIO (0.8), CUTOFF (0.1): the PACT point
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN); image resolution: MODEL_ARGS=max_pixels=...,min_pixels=...
# Tiny local smoke test:
#   MODEL=/tmp/tiny_qwen3 TASKS=pact_tiny_vqa INCLUDE_PATH=tests/eval_tasks MODEL_ARGS=layer=2,dtype=float32 \
#       bash scripts/pact_qwen3-vl-8b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-Qwen/Qwen3-VL-8B-Instruct}
LMMS_MODEL=${LMMS_MODEL:-pact_qwen3_vl}
TASKS=${TASKS:-$PAPER_QWEN_TASKS}
OUTPUT=${OUTPUT:-runs/pact_qwen3-vl-8b}
KEEP_RATIO=${KEEP_RATIO:-0.8}
CUTOFF=${CUTOFF:-0.1}
LOAD="pretrained=$MODEL,dtype=bfloat16,attn_implementation=sdpa"

for task in $(task_list "$TASKS"); do
    run_eval "$LMMS_MODEL" "$LOAD,pact_config=pact,keep_ratio=$KEEP_RATIO,cutoff=$CUTOFF" \
        "$task" "$OUTPUT/pact" "pact_$task"
    run_baseline "$LMMS_MODEL" "$LOAD" "$task" "$OUTPUT"
done
finish "$OUTPUT"
