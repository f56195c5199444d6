# Shared helpers of the evaluation scripts in this folder. Sourced, not run.
#
# Every script reads these environment variables (on top of its own MODEL / TASKS / OUTPUT):
#   PYTHON        interpreter (default: .venv/bin/python if present, else python)
#   LAUNCHER      how lmms-eval is started (default: "$PYTHON -m lmms_eval"); data parallel on 8 GPUs:
#                 LAUNCHER="accelerate launch --num_processes 8 -m lmms_eval"
#   BATCH_SIZE    requests per model call (default 1, as in the paper)
#   MODEL_ARGS    extra --model_args appended last, so they win (e.g. dtype=bfloat16,layer=2)
#   INCLUDE_PATH  extra lmms-eval task folder (--include_path), e.g. tests/eval_tasks
#   LIMIT         --limit N (smoke tests only; scores on a subset are not the paper's)
#   BASELINE      1 (default): also run the no-reduction reference (needed by `pact report/plot`)
#   DRY_RUN       1: print the lmms-eval commands instead of running them
# Tasks may be separated by spaces or commas. Each task runs in its own process (like the
# reference scripts); a failing run (no new results file) does not stop the others, the script
# lists the failed runs and exits 1 at the end.

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
LAUNCHER=${LAUNCHER:-"$PYTHON -m lmms_eval"}
BATCH_SIZE=${BATCH_SIZE:-1}
MODEL_ARGS=${MODEL_ARGS:-}
INCLUDE_PATH=${INCLUDE_PATH:-}
LIMIT=${LIMIT:-}
BASELINE=${BASELINE:-1}
DRY_RUN=${DRY_RUN:-0}
FAILED=()

# The paper's task lists (lmms-eval names): its 16 LLaVA-OneVision tasks and its 12 Qwen2-VL tasks.
PAPER_OV_TASKS="mmmu_val infovqa_val mme mmstar docvqa_val mmbench_en_dev ai2d chartqa muirbench llava_interleave_bench_out_domain scienceqa_img textvqa_val videomme mlvu_dev perceptiontest_test_mc egoschema"
PAPER_QWEN_TASKS="mmmu_val infovqa_val mme mmstar docvqa_val mmbench_en_dev ai2d chartqa muirbench llava_interleave_bench_out_domain textvqa_val egoschema"

# task_list "a,b c" -> "a b c"
task_list() {
    echo "$1" | tr ',' ' '
}

# with_extra ARGS -> ARGS followed by $MODEL_ARGS (later keys override earlier ones)
with_extra() {
    if [ -n "$MODEL_ARGS" ]; then echo "$1,$MODEL_ARGS"; else echo "$1"; fi
}

# run_eval LMMS_MODEL MODEL_ARGS TASK OUTPUT_DIR NAME
run_eval() {
    local model=$1 args=$2 task=$3 out=$4 name=$5
    # shellcheck disable=SC2206  # LAUNCHER is a command line: split it into words on purpose
    local cmd=($LAUNCHER --model "$model" --model_args "$(with_extra "$args")" --tasks "$task"
        --batch_size "$BATCH_SIZE" --log_samples --log_samples_suffix "$name" --output_path "$out")
    if [ -n "$INCLUDE_PATH" ]; then cmd+=(--include_path "$INCLUDE_PATH"); fi
    if [ -n "$LIMIT" ]; then cmd+=(--limit "$LIMIT"); fi
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    echo ">>> ${cmd[*]}"
    # lmms-eval prints a failing run's traceback and still exits 0, so success is judged by a new
    # results file in the output folder.
    local before after
    before=$(count_results "$out")
    "${cmd[@]}" || true
    after=$(count_results "$out")
    if [ "$after" -le "$before" ]; then FAILED+=("$name"); fi
}

# count_results DIR: number of lmms-eval results files under DIR
count_results() {
    { find "$1" -name '*_results.json' 2>/dev/null || true; } | wc -l
}

# run_baseline LMMS_MODEL LOADING_ARGS TASK OUTPUT_ROOT: the no-reduction reference of a task
run_baseline() {
    if [ "$BASELINE" = 1 ]; then
        run_eval "$1" "$2,pact_config=no_reduction" "$3" "$4/no_reduction" "no_reduction_$3"
    fi
}

# run_at_ratios LMMS_MODEL LOAD OUTPUT ARGS_FN NAME...: the sweep every comparison script runs. For
# every task of $TASKS: the no-reduction reference (run_baseline), then each NAME at each ratio of
# $RATIOS, with the --model_args "$LOAD,$(ARGS_FN NAME),target_ratio=<ratio>", into OUTPUT/NAME as
# the run NAME_r<ratio>_<task>. ARGS_FN is the script's function from a name to its config args; an
# unknown name (ARGS_FN fails) stops the script before anything runs.
run_at_ratios() {
    local model=$1 load=$2 out=$3 args_fn=$4
    shift 4
    local task name ratio
    local -A args=()
    for name in "$@"; do
        args[$name]=$("$args_fn" "$name") || exit 2
    done
    for task in $(task_list "$TASKS"); do
        run_baseline "$model" "$load" "$task" "$out"
        for name in "$@"; do
            for ratio in $RATIOS; do
                run_eval "$model" "$load,${args[$name]},target_ratio=$ratio" "$task" "$out/$name" \
                    "${name}_r${ratio}_$task"
            done
        done
    done
}

finish() {
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "failed runs: ${FAILED[*]}" >&2
        exit 1
    fi
    if [ "$DRY_RUN" != 1 ]; then
        echo "done. Report: $PYTHON -m pact report $1    Figure: $PYTHON -m pact plot $1 --out $1/figure.png"
    fi
}
