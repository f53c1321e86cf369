#!/usr/bin/env bash
# The README's main job. For now: set up .venv and train the baseline student on bundled ETTh1,
# printing its test metrics (the service issue turns this into "build the model, then serve").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m training train --model mlp --dataset ETTh1 --lookback 336 --horizon 96 \
    --out runs/quickstart-mlp "$@"
