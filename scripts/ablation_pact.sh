#!/usr/bin/env bash
# Paper Fig. 10 (PACT components), at equal reduction (target_ratio), plus the no-reduction
# reference once per task:
#   pact          PACT at the chosen layer L, retrieval of pruned tokens on        label pact
#   no_retrieval  the same without the retrieval step (retrieval=false)            label pact_no_retrieval
#   layers        PACT at each of OTHER_LAYERS instead of L                        label pact_layer<N>
# L is CHOSEN_LAYER: 4 by default (the paper's layer for LLaVA-OneVision-7B), or CHOSEN_LAYER=auto
# to choose it with `pact calibrate` on MODEL (a local checkpoint directory) first; its report is
# written to $OUTPUT/calibrate. Figure: `pact plot $OUTPUT`.
#
#   bash scripts/ablation_pact.sh
#   MODEL=/ckpt/llava-ov CHOSEN_LAYER=auto OTHER_LAYERS="2 8" TASKS=textvqa_val bash scripts/ablation_pact.sh
#
# Environment:
#   MODEL          checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf, the paper's model)
#   LMMS_MODEL     lmms-eval model name (default pact_llava_onevision)
#   DTYPE          default float16
#   TASKS          lmms-eval tasks (default: the paper's 16 LLaVA-OneVision tasks; start with a few)
#   VARIANTS       subset of: pact no_retrieval layers (default all three)
#   CHOSEN_LAYER   the reduction layer of pact and no_retrieval (default 4; "auto": pact calibrate)
#   OTHER_LAYERS   layers compared with it (default "2 8"; the chosen layer itself is skipped)
#   CALIBRATE_ARGS extra options of `pact calibrate` for CHOSEN_LAYER=auto (e.g. "--images a.jpg b.jpg")
#   PACT_ARGS      extra keys of every PACT run (default empty, e.g. cutoff=0.1 for Qwen2-VL)
#   RATIOS         target reduction ratios (default 0.3 0.4 0.5 0.6 0.7 0.8)
#   OUTPUT         output folder (default runs/ablation_pact)
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN). MODEL_ARGS is appended last: do not put layer= in it.
# Tiny local smoke test:
#   MODEL=/tmp/tiny_qwen LMMS_MODEL=pact_qwen2_vl TASKS=pact_tiny_mc INCLUDE_PATH=tests/eval_tasks \
#       MODEL_ARGS=dtype=float32 CHOSEN_LAYER=auto OTHER_LAYERS=3 RATIOS=0.5 bash scripts/ablation_pact.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
DTYPE=${DTYPE:-float16}
TASKS=${TASKS:-$PAPER_OV_TASKS}
VARIANTS=${VARIANTS:-"pact no_retrieval layers"}
CHOSEN_LAYER=${CHOSEN_LAYER:-4}
OTHER_LAYERS=${OTHER_LAYERS:-"2 8"}
CALIBRATE_ARGS=${CALIBRATE_ARGS:-}
PACT_ARGS=${PACT_ARGS:-}
RATIOS=${RATIOS:-"0.3 0.4 0.5 0.6 0.7 0.8"}
OUTPUT=${OUTPUT:-runs/ablation_pact}
LOAD="pretrained=$MODEL,dtype=$DTYPE,attn_implementation=sdpa"

if [ "$CHOSEN_LAYER" = auto ]; then
    # shellcheck disable=SC2206  # CALIBRATE_ARGS is a list of options: split it into words on purpose
    calibrate=($PYTHON -m pact calibrate --model "$MODEL" --config pact --out "$OUTPUT/calibrate"
        --dtype "$DTYPE" $CALIBRATE_ARGS)
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "${calibrate[@]}"
        echo
        CHOSEN_LAYER=4 # what the dry run's commands show in place of the calibrated layer
    else
        echo ">>> ${calibrate[*]}"
        "${calibrate[@]}"
        CHOSEN_LAYER=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["layer"])' \
            "$OUTPUT/calibrate/calibration.json")
        echo "pact calibrate chose layer $CHOSEN_LAYER"
    fi
fi

pact_args() {
    echo "pact_config=pact,layer=$1${PACT_ARGS:+,$PACT_ARGS},label=$2"
}

# run name -> its config args: pact, no_retrieval, layer<L> (a fixed layer instead of the chosen one)
run_args() {
    case $1 in
        pact) pact_args "$CHOSEN_LAYER" pact ;;
        no_retrieval) echo "$(pact_args "$CHOSEN_LAYER" pact_no_retrieval),retrieval=false" ;;
        layer*) pact_args "${1#layer}" "pact_$1" ;;
    esac
}

# The variants as run names ("layers" is one run per layer of OTHER_LAYERS other than the chosen one).
runs=()
for variant in $VARIANTS; do
    case $variant in
        pact | no_retrieval) runs+=("$variant") ;;
        layers)
            for layer in $OTHER_LAYERS; do
                if [ "$layer" != "$CHOSEN_LAYER" ]; then runs+=("layer$layer"); fi
            done
            ;;
        *)
            echo "unknown PACT variant $variant (choose from: pact no_retrieval layers)" >&2
            exit 2
            ;;
    esac
done

run_at_ratios "$LMMS_MODEL" "$LOAD" "$OUTPUT" run_args ${runs[@]+"${runs[@]}"}
finish "$OUTPUT"
