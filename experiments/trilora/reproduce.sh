#!/usr/bin/env bash
# TriLoRA's Table 1 and the over-training curves in the mini world, from a clean checkout:
# one run (4 adapters x 3 seeds, ~25 min on 2 CPU cores), then the table, CSVs, verdicts and
# curves plot rebuilt from its results.json into this folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
lorabench experiment=trilora/world
python -m lorabench.protocols rebuild trilora outputs/trilora/world/vango --out experiments/trilora
