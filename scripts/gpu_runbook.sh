#!/usr/bin/env bash
# GPU runbook for Table 1's large rows (issue 5; costs and data in docs/large-settings.md).
#
# For each setting, cheapest first: fetch and verify its data (and pretrained weights), build or resume its
# ground truth, then run Table 1's method (EK-FAC, damping chosen on validation queries) for the LDS, all
# inside one wall-clock budget. Every step resumes: rerun the same command to continue where it stopped.
# A setting whose data or weights are not on this machine is skipped with the reason, never faked.
#
#   scripts/gpu_runbook.sh [SETTING ...]    default: fmnist-resnet mnist-vit flowers102-resnet50 food101-vitb16
#
# Environment: BUDGET_S   total budget in seconds (default 14400 = 4 h)
#              DEVICE     cuda (default) or cpu
#              SOLVER     method to run (default ekfac)
#              EXECUTOR   local (default) or ray; with ray, GPUS_PER_TASK (default 0.25 for the reduced
#                         settings, 1 for the large ones) and RAY_ADDRESS (default: a Ray instance here)
#              PY         python to use (default .venv/bin/python)
#              LAST_BLOCKS  attribute through the last k blocks and the head only (default: every parameter)
#              TDABENCH_SCORE_MEMORY_MB  memory for blocks of preconditioned query gradients; each block is one
#                         pass over the training set (default here 65536 on cuda = one or a few passes)
# Writes:      results/gt/<setting>/v*/, results/runs/<setting>/<solver>.json,
#              results/gpu_runbook/timings.jsonl (one line per stage: seconds, exit status, GPU)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
BUDGET_S=${BUDGET_S:-14400}
DEVICE=${DEVICE:-cuda}
SOLVER=${SOLVER:-ekfac}
EXECUTOR=${EXECUTOR:-local}
LAST_BLOCKS=${LAST_BLOCKS:-}
if [ "$DEVICE" = cuda ]; then export TDABENCH_SCORE_MEMORY_MB=${TDABENCH_SCORE_MEMORY_MB:-65536}; fi
SETTINGS=("$@")
[ ${#SETTINGS[@]} -eq 0 ] && SETTINGS=(fmnist-resnet mnist-vit flowers102-resnet50 food101-vitb16)
OUT=results/gpu_runbook
mkdir -p "$OUT"
START=$(date +%s)

# Relative cost of each setting's ground truth (docs/large-settings.md), to share the budget out.
weight() {
    case "$1" in
        fmnist-resnet|mnist-vit) echo 1 ;;
        flowers102-resnet50) echo 8 ;;
        food101-vitb16) echo 40 ;;
        *) echo 1 ;;
    esac
}
remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
gpu_name() {
    "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null
}
record() {  # setting stage seconds status
    printf '{"setting": "%s", "stage": "%s", "seconds": %s, "status": %s, "device": "%s", "budget_s": %s, "at": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$GPU" "$BUDGET_S" "$(date -u +%FT%TZ)" >> "$OUT/timings.jsonl"
}
stage() {  # setting stage limit_s command... : run under a time limit (SIGINT first: units are atomic)
    local setting=$1 name=$2 limit=$3; shift 3
    local t0=$(date +%s) status
    echo "== $setting: $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=120 "$limit" "$@"
    status=$?
    record "$setting" "$name" $(( $(date +%s) - t0 )) "$status"
    [ "$status" -eq 124 ] && echo "   $setting: $name stopped at its time limit; rerun the runbook to resume"
    return "$status"
}

GPU=$(gpu_name)
if [ "$DEVICE" = cuda ] && [ "$GPU" = cpu ]; then
    echo "gpu_runbook: no CUDA device visible to $PY (torch.cuda.is_available() is False); run it on a GPU" \
         "machine, or DEVICE=cpu to run (slowly) on the CPU" >&2
    exit 2
fi
echo "gpu_runbook: ${SETTINGS[*]} on $GPU, budget ${BUDGET_S}s, solver $SOLVER, executor $EXECUTOR"

for i in "${!SETTINGS[@]}"; do
    s=${SETTINGS[$i]}
    left=$(remaining)
    if [ "$left" -lt 120 ]; then
        echo "gpu_runbook: budget spent before $s; rerun to continue"
        break
    fi
    total=0
    for t in "${SETTINGS[@]:$i}"; do total=$(( total + $(weight "$t") )); done
    share=$(( left * $(weight "$s") / total ))

    # 1. data and weights: fetched once, verified, cached; a setting that cannot get them is skipped
    if ! stage "$s" data $(( share / 4 > 600 ? share / 4 : 600 )) "$PY" -m benchmark data "$s"; then
        echo "gpu_runbook: skipping $s: its data or weights are not available here (see the error above and" \
             "docs/large-settings.md)"
        continue
    fi

    # 2. ground truth: resumes from the units already written; timing out leaves a valid partial artifact
    gt_args=(gt "$s" --device "$DEVICE" --quiet)  # the large settings choose the loop trainer themselves
    case "$s" in
        flowers102-resnet50|food101-vitb16) gpt=${GPUS_PER_TASK:-1} ;;
        *) gpt=${GPUS_PER_TASK:-0.25} ;;
    esac
    if [ "$EXECUTOR" = ray ]; then
        gt_args+=(--executor ray --trainer loop)
        [ "$DEVICE" = cuda ] && gt_args+=(--gpus-per-task "$gpt")
        [ -n "${RAY_ADDRESS:-}" ] && gt_args+=(--address "$RAY_ADDRESS")
    fi
    left=$(remaining)
    gt_limit=$(( share * 4 / 5 ))
    floor=$(( left < 600 ? left : 600 ))  # every setting gets a real start, even the cheap ones
    gt_limit=$(( gt_limit > floor ? gt_limit : floor ))
    stage "$s" ground-truth "$gt_limit" "$PY" -m benchmark "${gt_args[@]}"

    # 3. Table 1's method: needs at least one complete seed replica (the run record says which were used)
    left=$(remaining)
    if [ "$left" -lt 60 ]; then
        echo "gpu_runbook: no budget left to run $SOLVER on $s; rerun to continue"
        break
    fi
    if "$PY" -m benchmark gt "$s" --verify > "$OUT/$s.gt.json" 2> "$OUT/$s.gt.err"; then
        run_args=(run --setting "$s" --solver "$SOLVER" --task lds --device "$DEVICE")
        [ -n "$LAST_BLOCKS" ] && run_args+=(--param "last_blocks=$LAST_BLOCKS")
        stage "$s" "run-$SOLVER" "$left" "$PY" -m benchmark "${run_args[@]}" \
            || echo "gpu_runbook: $SOLVER on $s did not finish (see above); rerun to retry"
    else
        echo "gpu_runbook: no ground truth to evaluate for $s yet: $(tail -n 1 "$OUT/$s.gt.err")"
    fi
done

echo "gpu_runbook: done in $(( $(date +%s) - START ))s; timings in $OUT/timings.jsonl"
for s in "${SETTINGS[@]}"; do
    [ -f "results/runs/$s/$SOLVER.json" ] && echo "  $s: results/runs/$s/$SOLVER.json"
done
exit 0
