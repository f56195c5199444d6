#!/usr/bin/env bash
# The three custom-method configurations of the reference (your own pruning and/or clustering
# functions, see pact/custom.py), on InfoVQA with LLaVA-OneVision-7B by default, plus the
# no-reduction reference.
#
#   bash scripts/test_custom.sh
#   CUSTOM_PRUNING_FN=mypkg.scores:my_scores bash scripts/test_custom.sh
#
# Environment:
#   MODEL     checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf)
#   TASKS     lmms-eval tasks (default infovqa_val)
#   CONFIGS   subset of: custom_clustering custom_pruning custom_combined (default all three)
#   CUSTOM_PRUNING_FN / CUSTOM_REDUCTION_FN  "pkg.module:function" (default: pact.custom's examples)
#   OUTPUT    output folder (default runs/test_custom)
#   LMMS_MODEL  lmms-eval model name (default pact_llava_onevision)
#   and the common variables of scripts/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
TASKS=${TASKS:-infovqa_val}
CONFIGS=${CONFIGS:-"custom_clustering custom_pruning custom_combined"}
OUTPUT=${OUTPUT:-runs/test_custom}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
LOAD="pretrained=$MODEL,dtype=float16,attn_implementation=sdpa"
HOOKS=""
if [ -n "${CUSTOM_PRUNING_FN:-}" ]; then HOOKS="$HOOKS,custom_pruning_fn=$CUSTOM_PRUNING_FN"; fi
if [ -n "${CUSTOM_REDUCTION_FN:-}" ]; then HOOKS="$HOOKS,custom_reduction_fn=$CUSTOM_REDUCTION_FN"; fi

# The reference's values on top of configs/<name>.json (the example custom merging reads cutoff as
# a window size).
config_args() {
    case $1 in
        custom_clustering) echo "pact_config=custom_clustering,cutoff=3" ;;
        custom_pruning) echo "pact_config=custom_pruning,keep_ratio=0.353" ;;
        custom_combined) echo "pact_config=custom_combined,keep_ratio=0.7,cutoff=2" ;;
        *)
            echo "unknown custom config $1" >&2
            return 1
            ;;
    esac
}

for task in $(task_list "$TASKS"); do
    for name in $CONFIGS; do
        args=$(config_args "$name")
        run_eval "$LMMS_MODEL" "$LOAD,$args$HOOKS" "$task" "$OUTPUT/$name" "${name}_$task"
    done
    run_baseline "$LMMS_MODEL" "$LOAD" "$task" "$OUTPUT"
done
finish "$OUTPUT"
