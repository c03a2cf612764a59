#!/usr/bin/env bash
# Round two of the claims ledger (issue 34), exactly as the papers' preregistration_2.md fix it, in the
# order they fix (the plan of experiments/power_round1.md's rule):
#   bash experiments/round2.sh            # every job not done yet, in order; ~3.6 h on 2 CPU cores
#   bash experiments/round2.sh list       # the jobs and whether each is done
# A job is done when its results.json is under experiments/<paper>/runs/round2/; a killed continual run
# resumes from its state when started again (outputs under $LORABENCH_OUTPUTS, default outputs/round2).
# Continual runs go two at a time, one thread each (1.4x one two-thread process on 2 cores, issue 21).
set -euo pipefail
cd "$(dirname "$0")/.."
LB=${LORABENCH:-.venv/bin/lorabench}
export LORABENCH_OUTPUTS=${LORABENCH_OUTPUTS:-outputs/round2}
OUT=$LORABENCH_OUTPUTS
METHODS=(naive merge_init ortho_init magmax)

keep() {  # keep SRC DST: the run's results and figures, not its cells or state
    mkdir -p "$2"
    for f in results.json table.md samples.png update_size.png curves.png curves.csv table.csv verdicts.json \
             score_matrix.png; do
        [ -f "$1/$f" ] && cp "$1/$f" "$2/"
    done
    return 0
}

# One continual job: KIND (styles_lr3e-3 | objects_lr3e-4) ORDER SEED METHOD
cl_cmd() {
    case "$1" in
        styles_lr3e-3) echo "experiment=continual/world_styles" ;;
        objects_lr3e-4) echo "experiment=continual/regime_objects optim.lr=3e-4" ;;
    esac
}
cl_src() {
    case "$1" in
        styles_lr3e-3) echo "$OUT/continual/world_styles/$4/order$2-seed$3" ;;
        objects_lr3e-4) echo "$OUT/continual/regime_objects/lr0.0003/$4/order$2-seed$3" ;;
    esac
}
cl_dst() { echo "experiments/continual/runs/round2/${5:-$1}/$4/order$2-seed$3"; }  # 5th: another folder
cl_run() {  # run one continual job unless done; its console log beside its results
    local dst; dst=$(cl_dst "$@")
    [ -f "$dst/results.json" ] && return 0
    # one thread each when two run side by side; the check alone with the default threads, as round one's
    # world runs (the thread count changes the order of float sums)
    local threads=1
    [ "${5:-}" = check ] && threads=$(nproc)
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$LB" $(cl_cmd "$1") protocol.method.name="$4" \
        sequence.order_seed="$2" seed="$3" > "$OUT/log-$1-$4-order$2-seed$3${5:+-$5}.txt" 2>&1
    keep "$(cl_src "$@")" "$dst"
}

# The jobs, in the pre-registered order. Continual: the paper's runs (order seeds {0, 5, 10, 42} x
# training seeds {0, 5}) that round one lacks; the check job first (a round-one run again).
CHECK=("styles_lr3e-3 0 0 naive check")  # compared with runs/world_styles/naive/order0-seed0, not pooled
STYLES=()
for os in "42 0" "0 5" "5 5" "10 5" "42 5"; do
    for m in "${METHODS[@]}"; do STYLES+=("styles_lr3e-3 $os $m"); done
done
OBJECTS=()
for os in "10 0" "42 0" "0 5" "5 5" "10 5" "42 5"; do
    for m in "${METHODS[@]}"; do OBJECTS+=("objects_lr3e-4 $os $m"); done
done

tl_run() {  # NAME EXPERIMENT LR: TriLoRA seeds 3, 4, 5 in one run
    local dst="experiments/trilora/runs/round2/$1"
    [ -f "$dst/results.json" ] && return 0
    "$LB" "$2" optim.lr="$3" 'protocol.seeds=[3,4,5]' "hydra.run.dir=$OUT/trilora/$1" > "$OUT/log-trilora-$1.txt" 2>&1
    keep "$OUT/trilora/$1" "$dst"
}

pairs() {  # run the continual jobs given, two at a time
    local jobs=("$@") i
    for ((i = 0; i < ${#jobs[@]}; i += 2)); do
        # shellcheck disable=SC2086
        cl_run ${jobs[i]} &
        local a=$!
        if ((i + 1 < ${#jobs[@]})); then
            # shellcheck disable=SC2086
            cl_run ${jobs[i + 1]} &
            wait $!
        fi
        wait "$a"
    done
}

list() {
    for j in "${CHECK[@]}"; do
        # shellcheck disable=SC2086
        d=$(cl_dst $j); echo "check   $j: $([ -f "$d/results.json" ] && echo done || echo todo)"; done
    for j in "${STYLES[@]}" "${OBJECTS[@]}"; do
        # shellcheck disable=SC2086
        d=$(cl_dst $j); echo "cl      $j: $([ -f "$d/results.json" ] && echo done || echo todo)"; done
    for t in vango_lr3e-4 vango_lr1e-3 vango_lr3e-3; do
        echo "trilora $t: $([ -f "experiments/trilora/runs/round2/$t/results.json" ] && echo done || echo todo)"; done
}

mkdir -p "$OUT"
case "${1:-run}" in
    list) list ;;
    run)
        tl_run vango_lr3e-4 experiment=trilora/regime 3e-4       # 1. TriLoRA lr 3e-4 (and the matched regime)
        # shellcheck disable=SC2086
        cl_run ${CHECK[0]}                                       # 2. the check, alone,
        pairs "${STYLES[@]}"                                     #    then styles at lr 3e-3 to 8 runs
        tl_run vango_lr1e-3 experiment=trilora/regime 1e-3       # 3. TriLoRA lr 1e-3
        pairs "${OBJECTS[@]}"                                    # 4. objects at lr 3e-4 to 8 runs
        tl_run vango_lr3e-3 experiment=trilora/world 3e-3        # 5. TriLoRA lr 3e-3 (the table's recipe)
        list ;;
    *) echo "usage: bash experiments/round2.sh [run|list]" >&2; exit 2 ;;
esac
