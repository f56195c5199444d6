#!/usr/bin/env bash
# Paper Fig. 9 (EUTI components): EUTI's importance score s_i = (global-query attention) x ||h_i||,
# against each factor alone, as pruning-only methods at equal reduction (target_ratio: each keeps
# exactly the same number of visual tokens), plus the no-reduction reference once per task.
#   euti          both factors (configs/euti.json: multiply_by_norm=true)        label euti
#   global_query  the global-query attention alone (multiply_by_norm=false)     label euti_global_query
#   norm          the hidden-state norm alone (pruning=norm, same layer and p)  label euti_norm
# Figure: `pact plot $OUTPUT`.
#
#   bash scripts/ablation_euti.sh
#   VARIANTS="euti norm" RATIOS="0.5 0.7" TASKS=textvqa_val bash scripts/ablation_euti.sh
#
# Environment:
#   MODEL       checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf, the paper's model)
#   LMMS_MODEL  lmms-eval model name (default pact_llava_onevision)
#   DTYPE       default float16
#   TASKS       lmms-eval tasks (default: the paper's 16 LLaVA-OneVision tasks; start with a few)
#   VARIANTS    subset of: euti global_query norm (default all three)
#   RATIOS      target reduction ratios (default 0.3 0.4 0.5 0.6 0.7 0.8)
#   OUTPUT      output folder (default runs/ablation_euti)
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN).
# Tiny local smoke test:
#   MODEL=/tmp/tiny_qwen LMMS_MODEL=pact_qwen2_vl TASKS=pact_tiny_mc INCLUDE_PATH=tests/eval_tasks \
#       MODEL_ARGS=layer=2,dtype=float32 RATIOS=0.5 bash scripts/ablation_euti.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
DTYPE=${DTYPE:-float16}
TASKS=${TASKS:-$PAPER_OV_TASKS}
VARIANTS=${VARIANTS:-"euti global_query norm"}
RATIOS=${RATIOS:-"0.3 0.4 0.5 0.6 0.7 0.8"}
OUTPUT=${OUTPUT:-runs/ablation_euti}
LOAD="pretrained=$MODEL,dtype=$DTYPE,attn_implementation=sdpa"

# Every variant starts from configs/euti.json (same layer, norm order and EUTI options) and gets
# an explicit label, since the report and plot group runs by label.
variant_args() {
    case $1 in
        euti) echo "pact_config=euti,multiply_by_norm=true,label=euti" ;;
        global_query) echo "pact_config=euti,multiply_by_norm=false,label=euti_global_query" ;;
        norm) echo "pact_config=euti,pruning=norm,label=euti_norm" ;;
        *)
            echo "unknown EUTI variant $1 (choose from: euti global_query norm)" >&2
            return 1
            ;;
    esac
}

# shellcheck disable=SC2086  # VARIANTS is a list of names: split it into words on purpose
run_at_ratios "$LMMS_MODEL" "$LOAD" "$OUTPUT" variant_args $VARIANTS
finish "$OUTPUT"
