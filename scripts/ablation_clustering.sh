#!/usr/bin/env bash
# Paper Fig. 8: clustering algorithms at equal reduction. DBDPC against agglomerative clustering,
# k-means, DPC and DBSCAN, each alone (no pruning, clustering on the layer-L keys) and each asked
# for the same target reduction ratios (config key target_ratio: every algorithm searches its own
# parameter -- cutoff, cluster count, eps -- to remove that share of the visual tokens), plus the
# no-reduction reference once per task. Figure: `pact plot $OUTPUT`.
#
#   bash scripts/ablation_clustering.sh
#   METHODS="dbdpc kmeans" RATIOS="0.5 0.7" TASKS=textvqa_val bash scripts/ablation_clustering.sh
#
# Environment:
#   MODEL       checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf, the paper's model)
#   LMMS_MODEL  lmms-eval model name (default pact_llava_onevision)
#   DTYPE       default float16
#   TASKS       lmms-eval tasks (default: the paper's 16 LLaVA-OneVision tasks -- days of GPU time;
#               start with a few)
#   METHODS     subset of: dbdpc agglomerative kmeans dpc dbscan (default all five)
#   RATIOS      target reduction ratios (default 0.3 0.4 0.5 0.6 0.7 0.8)
#   OUTPUT      output folder (default runs/ablation_clustering)
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN).
# Tiny local smoke test:
#   MODEL=/tmp/tiny_qwen LMMS_MODEL=pact_qwen2_vl TASKS=pact_tiny_mc INCLUDE_PATH=tests/eval_tasks \
#       MODEL_ARGS=layer=2,dtype=float32 METHODS="dbdpc kmeans" RATIOS=0.5 bash scripts/ablation_clustering.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
DTYPE=${DTYPE:-float16}
TASKS=${TASKS:-$PAPER_OV_TASKS}
METHODS=${METHODS:-"dbdpc agglomerative kmeans dpc dbscan"}
RATIOS=${RATIOS:-"0.3 0.4 0.5 0.6 0.7 0.8"}
OUTPUT=${OUTPUT:-runs/ablation_clustering}
LOAD="pretrained=$MODEL,dtype=$DTYPE,attn_implementation=sdpa"

# configs/<method>.json: clustering alone (pruning none); target_ratio replaces its amount parameter.
method_args() {
    case $1 in
        dbdpc | agglomerative | kmeans | dpc | dbscan) echo "pact_config=$1" ;;
        *)
            echo "unknown clustering method $1 (choose from: dbdpc agglomerative kmeans dpc dbscan)" >&2
            return 1
            ;;
    esac
}

# shellcheck disable=SC2086  # METHODS is a list of names: split it into words on purpose
run_at_ratios "$LMMS_MODEL" "$LOAD" "$OUTPUT" method_args $METHODS
finish "$OUTPUT"
