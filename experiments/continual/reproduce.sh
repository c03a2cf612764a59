#!/usr/bin/env bash
# The world tables of the continual paper, from a checkout with the README's install:
#   bash experiments/continual/reproduce.sh            # ~55 min (objects) + ~45 min (styles) on 2 CPU cores
# 4 methods x order seeds {0, 5, 10} x training seed 0 per sequence, one run after another; a killed
# run resumes when this is started again. Then the tables, verdicts and sign-conflict plot.
set -euo pipefail
cd "$(dirname "$0")/../.."
LB=${LORABENCH:-.venv/bin/lorabench}
PY=${PYTHON:-.venv/bin/python}
for seq in world_objects world_styles; do
    "$LB" --multirun "experiment=continual/$seq" protocol.method.name=naive,merge_init,ortho_init,magmax \
        sequence.order_seed=0,5,10 seed=0
done
"$PY" -m lorabench.protocols.continual "${LORABENCH_OUTPUTS:-outputs}/continual/world_objects" \
    "${LORABENCH_OUTPUTS:-outputs}/continual/world_styles" --out experiments/continual
