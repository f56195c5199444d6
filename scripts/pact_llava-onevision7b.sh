#!/usr/bin/env bash
# PACT on LLaVA-OneVision-7B over the paper's 16 benchmarks, at the paper's operating point
# (reduction before layer 4, EUTI keeps 55 %, DBDPC cutoff 0.21, retrieval alpha 1.5), plus the
# no-reduction reference of every task.
#
#   bash scripts/pact_llava-onevision7b.sh
#   MODEL=/ckpt/llava-ov TASKS="mme ai2d" OUTPUT=runs/ov bash scripts/pact_llava-onevision7b.sh
#
# Environment:
#   MODEL   checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf, the Hugging Face port of the
#           paper's lmms-lab/llava-onevision-qwen2-7b-ov)
#   TASKS   lmms-eval tasks (default: the 16 below). videomme, mlvu_dev, perceptiontest_test_mc and
#           egoschema need the videos; perceptiontest/egoschema produce server submissions;
#           mmbench_en_dev may call GPT (OPENAI_API_KEY) for unparsable answers.
#   OUTPUT  output folder (default runs/pact_llava-onevision7b)
#   KEEP_RATIO (0.55), CUTOFF (0.21): the PACT point
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN).
# Tiny local smoke test:
#   MODEL=/tmp/tiny_ov TASKS=pact_tiny_vqa INCLUDE_PATH=tests/eval_tasks MODEL_ARGS=layer=2,dtype=float32 \
#       bash scripts/pact_llava-onevision7b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
# mlvu is called mlvu_dev in lmms-eval >= 0.4 (the reference's lmms-eval 0.3 called it mlvu).
TASKS=${TASKS:-$PAPER_OV_TASKS}
OUTPUT=${OUTPUT:-runs/pact_llava-onevision7b}
KEEP_RATIO=${KEEP_RATIO:-0.55}
CUTOFF=${CUTOFF:-0.21}
LOAD="pretrained=$MODEL,dtype=float16,attn_implementation=sdpa"

for task in $(task_list "$TASKS"); do
    run_eval pact_llava_onevision "$LOAD,pact_config=pact,keep_ratio=$KEEP_RATIO,cutoff=$CUTOFF" \
        "$task" "$OUTPUT/pact" "pact_$task"
    run_baseline pact_llava_onevision "$LOAD" "$task" "$OUTPUT"
done
finish "$OUTPUT"
