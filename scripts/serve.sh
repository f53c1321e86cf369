#!/usr/bin/env bash
# The README's main job: set up .venv, build the default model into the registry if it has none
# (pipeline --quick on bundled ETTh1), then serve forecasts on port 8000 with the embedded
# defaults (filesystem registry, in-process cache; Redis when DISTILCAST_REDIS_URL is set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/build_default_model.sh
exec bash scripts/launch_service.sh
