#!/usr/bin/env bash
# Import the bundled models (models_registry/bundled/: ETTh1 and ETTh2 at H=96, students with
# their teacher ensembles) into the registry ($DISTILCAST_REGISTRY_ROOT, else ./var/registry)
# when it holds no model. scripts/serve.sh runs this before serving, so a fresh clone serves
# without training; a registry that holds any model is left untouched. Checksums are verified
# before anything is written (python -m models_registry import).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON_BIN:-python}"
[ -x .venv/bin/python ] && python_bin=.venv/bin/python
exec "$python_bin" -m models_registry import --if-empty models_registry/bundled
