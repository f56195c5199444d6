#!/usr/bin/env bash
# Every method on LLaVA-OneVision-7B at the reference's comparison points (chosen to give similar
# reduction ratios), on InfoVQA by default, plus the no-reduction reference.
#
#   bash scripts/test_different_methods_llava-onevision7b.sh
#   METHODS="pact fastv tome" TASKS="infovqa_val mme" bash scripts/test_different_methods_llava-onevision7b.sh
#
# Environment:
#   MODEL    checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf)
#   TASKS    lmms-eval tasks (default infovqa_val, as the reference)
#   METHODS  subset of: pact dbdpc euti fastv tome vtw dpc kmeans agglomerative dbscan (default all)
#   OUTPUT   output folder (default runs/test_different_methods_llava-onevision7b)
#   LMMS_MODEL  lmms-eval model name (default pact_llava_onevision)
#   and the common variables of scripts/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
TASKS=${TASKS:-infovqa_val}
METHODS=${METHODS:-"pact dbdpc euti fastv tome vtw dpc kmeans agglomerative dbscan"}
OUTPUT=${OUTPUT:-runs/test_different_methods_llava-onevision7b}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
LOAD="pretrained=$MODEL,dtype=float16,attn_implementation=sdpa"

# The reference's points (its scripts/test_different_methods_llava-onevision7b.sh): each method's
# configs/<method>.json (the reference's JSON, in our key names) plus the value the reference
# exported on top of it.
method_args() {
    case $1 in
        pact) echo "pact_config=pact,keep_ratio=0.55,cutoff=0.21" ;;
        dbdpc) echo "pact_config=dbdpc,cutoff=0.21" ;;
        euti) echo "pact_config=euti,keep_ratio=0.4" ;;
        fastv) echo "pact_config=fastv,keep_ratio=0.353" ;;
        tome) echo "pact_config=tome,tome_keep_ratio=0.353" ;;
        vtw) echo "pact_config=vtw,vtw_keep_ratio=0.353" ;;
        dpc) echo "pact_config=dpc,cluster_ratio=0.4" ;;
        kmeans) echo "pact_config=kmeans,cluster_ratio=0.4" ;;
        agglomerative) echo "pact_config=agglomerative,cluster_ratio=0.4" ;;
        dbscan) echo "pact_config=dbscan,dbscan_eps=0.7" ;;
        *)
            echo "unknown method $1" >&2
            return 1
            ;;
    esac
}

for task in $(task_list "$TASKS"); do
    for method in $METHODS; do
        args=$(method_args "$method")
        run_eval "$LMMS_MODEL" "$LOAD,$args" "$task" "$OUTPUT/$method" "${method}_$task"
    done
    run_baseline "$LMMS_MODEL" "$LOAD" "$task" "$OUTPUT"
done
finish "$OUTPUT"
