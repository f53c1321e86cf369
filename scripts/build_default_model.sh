#!/usr/bin/env bash
# Build the default model (bundled ETTh1, H=96, the pipeline's --quick budget) into the registry,
# unless the registry already serves it. Used by scripts/serve.sh and the compose `train` service.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON_BIN:-python}"
[ -x .venv/bin/python ] && python_bin=.venv/bin/python
model="${DISTILCAST_DEFAULT_MODEL:-etth1-h96}"
root="${DISTILCAST_REGISTRY_ROOT:-./var/registry}"
if "$python_bin" -m models_registry --root "$root" show "$model@production" >/dev/null 2>&1; then
    echo "build_default_model: $model@production is already in $root" >&2
    exit 0
fi
echo "build_default_model: building $model into $root (pipeline --quick, a few minutes)" >&2
exec "$python_bin" -m training pipeline --dataset ETTh1 --horizon 96 --quick --registry "$root" \
    --name "$model"
