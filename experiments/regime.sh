#!/usr/bin/env bash
# The regime axis of issue 21, as each paper's preregistration.md fixes it, then the scoreboard:
#   bash experiments/regime.sh trilora                # ~50 min on 2 CPU cores (vango at 3e-4, 1e-3; monex at all three)
#   bash experiments/regime.sh continual              # ~64 min (16 runs, two at a time)
#   bash experiments/regime.sh orthogonal_adaptation  # ~70 min (two lrs, 60 cells each)
#   bash experiments/regime.sh all
# Each run's results and figures are copied to experiments/<paper>/runs/regime/ (the lr written as in the
# preregistration: 3e-4, 1e-3, 3e-3); the trained cells and sequence states stay under outputs/. The lr 3e-3
# regime of each paper is its committed table run. A killed continual run resumes when started again.
set -euo pipefail
cd "$(dirname "$0")/.."
LB=${LORABENCH:-.venv/bin/lorabench}
PY=${PYTHON:-.venv/bin/python}
OUT=${LORABENCH_OUTPUTS:-outputs}
declare -A NAME=([0.0003]=3e-4 [0.001]=1e-3 [0.003]=3e-3)

keep() {  # keep SRC DST: the run's results and figures, not its cells or state
    mkdir -p "$2"
    for f in results.json table.md samples.png update_size.png curves.png curves.csv table.csv verdicts.json \
             score_matrix.png table2.csv crosstalk.png merge_bars.png; do
        [ -f "$1/$f" ] && cp "$1/$f" "$2/"
    done
    return 0
}

trilora() {
    "$LB" --multirun experiment=trilora/regime optim.lr=3e-4,1e-3
    "$LB" --multirun experiment=trilora/regime optim.lr=3e-4,1e-3,3e-3 data.style=monex 'protocol.seeds=[0]'
    for style in vango monex; do
        for lr in 0.0003 0.001 0.003; do
            src="$OUT/trilora/regime/${style}_lr$lr"
            [ -d "$src" ] && keep "$src" "experiments/trilora/runs/regime/${style}_lr${NAME[$lr]}"
        done
    done
}

continual() {  # the two learning rates as two one-thread multiruns side by side (2 cores: 1.4x one process)
    local pids=()
    for lr in 3e-4 1e-3; do
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$LB" --multirun experiment=continual/regime_objects optim.lr=$lr \
            protocol.method.name=naive,merge_init,ortho_init,magmax sequence.order_seed=0,5 seed=0 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done  # a failed multirun stops the script (set -e), as before
    for lr in 0.0003 0.001; do
        for run in "$OUT/continual/regime_objects/lr$lr"/*/order*-seed*; do
            keep "$run" "experiments/continual/runs/regime/lr${NAME[$lr]}/$(basename "$(dirname "$run")")/$(basename "$run")"
        done
    done
}

orthogonal_adaptation() {
    "$LB" --multirun experiment=orthogonal_adaptation/regime optim.lr=3e-4,1e-3
    for lr in 0.0003 0.001; do
        keep "$OUT/orthogonal_adaptation/regime/lr$lr" "experiments/orthogonal_adaptation/runs/regime/lr${NAME[$lr]}"
    done
}

case "${1:-}" in
    trilora|continual|orthogonal_adaptation) "$1" ;;
    all) trilora; continual; orthogonal_adaptation ;;
    *) echo "usage: bash experiments/regime.sh trilora|continual|orthogonal_adaptation|all" >&2; exit 2 ;;
esac
"$PY" -m lorabench.protocols.scoreboard experiments
