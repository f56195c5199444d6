#!/usr/bin/env bash
# A grid of operating points per method, for the "metric ratio vs reduction ratio" curves: every
# method is asked for the same target reduction ratios (config key target_ratio: each method
# searches its own parameter to remove that share of the visual tokens), plus the no-reduction
# reference once per task. Draw the figure with `pact plot $OUTPUT`.
#
#   bash scripts/sweep.sh
#   METHODS="pact fastv" RATIOS="0.5 0.7" TASKS=textvqa_val bash scripts/sweep.sh
#   LMMS_MODEL=pact_qwen2_vl MODEL=Qwen/Qwen2-VL-7B-Instruct DTYPE=bfloat16 PACT_ARGS=cutoff=0.1 bash scripts/sweep.sh
#
# Environment:
#   MODEL       checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf)
#   LMMS_MODEL  lmms-eval model name (default pact_llava_onevision)
#   DTYPE       default float16
#   TASKS       lmms-eval tasks (default: the paper's 16 LLaVA-OneVision tasks -- a full sweep is
#               days of GPU time; start with a few)
#   METHODS     subset of: pact dbdpc euti fastv tome vtw dpc kmeans agglomerative dbscan
#               (default: pact dbdpc euti fastv tome vtw, the methods of the paper's main figure)
#   RATIOS      target reduction ratios (default 0.3 0.4 0.5 0.6 0.7 0.8)
#   PACT_ARGS   extra keys of the pact method (default empty)
#   OUTPUT      output folder (default runs/sweep)
#   and the common variables of scripts/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
DTYPE=${DTYPE:-float16}
TASKS=${TASKS:-$PAPER_OV_TASKS}
METHODS=${METHODS:-"pact dbdpc euti fastv tome vtw"}
RATIOS=${RATIOS:-"0.3 0.4 0.5 0.6 0.7 0.8"}
PACT_ARGS=${PACT_ARGS:-}
OUTPUT=${OUTPUT:-runs/sweep}
LOAD="pretrained=$MODEL,dtype=$DTYPE,attn_implementation=sdpa"

# configs/<method>.json; target_ratio then replaces the method's own amount parameter.
method_args() {
    case $1 in
        pact) echo "pact_config=pact${PACT_ARGS:+,$PACT_ARGS}" ;;
        dbdpc | euti | fastv | tome | vtw | dpc | kmeans | agglomerative | dbscan) echo "pact_config=$1" ;;
        *)
            echo "unknown method $1" >&2
            return 1
            ;;
    esac
}

# shellcheck disable=SC2086  # METHODS is a list of names: split it into words on purpose
run_at_ratios "$LMMS_MODEL" "$LOAD" "$OUTPUT" method_args $METHODS
finish "$OUTPUT"
