#!/usr/bin/env bash
# The README's main job: set up .venv, import the bundled models (models_registry/bundled/,
# no training) into the registry if it has none, build the default model only if the registry
# still lacks it (pipeline --quick on bundled ETTh1), then serve forecasts on port 8000 with the
# embedded defaults (filesystem registry, in-process cache; Redis when DISTILCAST_REDIS_URL is set)
# and one uvicorn worker per CPU: `scripts/serve.sh --workers N` (or WORKERS=N) chooses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/import_bundle.sh
bash scripts/build_default_model.sh
exec bash scripts/launch_service.sh "$@"
