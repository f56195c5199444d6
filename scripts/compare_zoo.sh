#!/usr/bin/env bash
# The whole method zoo at equal budgets: every bundled config (configs/*.json, as `pact config --list`
# prints them -- PACT, its 2024 baselines and the 2025-26 methods alike, no hand list) that runs on
# the model's family, each asked for the same target reduction ratios (config key target_ratio:
# every method meets it its own way, docs/CONFIGDOC.md "Equal-budget comparisons"), plus the
# no-reduction reference once per task; then `pact plot` draws all of them.
#
#   bash scripts/compare_zoo.sh
#   RATIOS="0.5 0.7" TASKS=textvqa_val EXCLUDE="custom_pruning custom_clustering" bash scripts/compare_zoo.sh
#
# Configs that do not run on the family (`families` of their method, e.g. hired on Qwen, evs on
# families without video frames) or refuse a budget are skipped with a note on stderr. Each run is
# labelled with its config name (report and plot group runs by label).
#
# Environment:
#   MODEL       checkpoint (default llava-hf/llava-onevision-qwen2-7b-ov-hf, the paper's model)
#   LMMS_MODEL  lmms-eval model name (default pact_llava_onevision; the family is its pact_ suffix)
#   DTYPE       default float16
#   TASKS       lmms-eval tasks (default: the paper's 16 LLaVA-OneVision tasks -- days of GPU time
#               per method; start with a few)
#   RATIOS      target reduction ratios (default 0.5 0.7 0.9)
#   CONFIGS     bundled config names to run (default: all of them but no_reduction)
#   EXCLUDE     config names to leave out (default: none)
#   OUTPUT      output folder (default runs/compare_zoo)
#   PLOT        1 (default): `pact plot $OUTPUT --out $OUTPUT/figure.png` at the end
#   and the common variables of scripts/_common.sh (PYTHON, LAUNCHER, BATCH_SIZE, MODEL_ARGS,
#   INCLUDE_PATH, LIMIT, BASELINE, DRY_RUN).
# Tiny local smoke test:
#   MODEL=/tmp/tiny_qwen LMMS_MODEL=pact_qwen2_vl TASKS=pact_tiny_mc INCLUDE_PATH=tests/eval_tasks \
#       MODEL_ARGS=layer=2,dtype=float32 CONFIGS="fastv random" RATIOS=0.5 bash scripts/compare_zoo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
LMMS_MODEL=${LMMS_MODEL:-pact_llava_onevision}
DTYPE=${DTYPE:-float16}
TASKS=${TASKS:-$PAPER_OV_TASKS}
RATIOS=${RATIOS:-"0.5 0.7 0.9"}
CONFIGS=${CONFIGS:-}
EXCLUDE=${EXCLUDE:-}
OUTPUT=${OUTPUT:-runs/compare_zoo}
PLOT=${PLOT:-1}
FAMILY=${LMMS_MODEL#pact_}
LOAD="pretrained=$MODEL,dtype=$DTYPE,attn_implementation=sdpa"

# zoo_configs FAMILY: the bundled configs (or $CONFIGS) that run on FAMILY with a budget, one per line
zoo_configs() {
    "$PYTHON" - "$1" "$CONFIGS" "$EXCLUDE" <<'EOF'
import sys

from pact.config import config_names, load_config
from pact.methods import REGISTRY
from pact.methods.listing import families_of

family, wanted, excluded = sys.argv[1], sys.argv[2].split(), set(sys.argv[3].split())
bundled = config_names()
unknown = [n for n in wanted + sorted(excluded) if n not in bundled]
if unknown:
    sys.exit(f"unknown config(s): {', '.join(unknown)}; bundled: {', '.join(bundled)}")
for name in wanted or bundled:
    if name == "no_reduction" or name in excluded:
        continue
    try:
        cfg = load_config(name, target_ratio=0.5)
    except ValueError as err:
        print(f"compare_zoo: skipping {name}: {err}", file=sys.stderr)
        continue
    if family not in families_of(REGISTRY[(cfg.pruning, cfg.clustering)]):
        print(f"compare_zoo: skipping {name}: it does not run on {family}", file=sys.stderr)
        continue
    print(name)
EOF
}

# config name -> its --model_args (the label names the run in the report and the plot)
zoo_args() {
    echo "pact_config=$1,label=$1"
}

names=$(zoo_configs "$FAMILY")
# shellcheck disable=SC2086  # names is a list of config names: split it into words on purpose
run_at_ratios "$LMMS_MODEL" "$LOAD" "$OUTPUT" zoo_args $names
if [ "$PLOT" = 1 ] && [ "$DRY_RUN" != 1 ] && [ "${#FAILED[@]}" -eq 0 ]; then
    "$PYTHON" -m pact plot "$OUTPUT" --out "$OUTPUT/figure.png"
fi
finish "$OUTPUT"
