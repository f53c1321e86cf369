#!/usr/bin/env bash
# Rebuild models_registry/bundled/, the models scripts/serve.sh serves on a fresh clone:
#
#   bash scripts/build_bundle.sh
#
# For ETTh1 and ETTh2 at H=96: `python -m training pipeline` (seed 0) into a scratch registry,
# which registers each family's teachers, their `-ensemble` group and the student; then
# `python -m models_registry export --names etth1-h96,etth2-h96` replaces models_registry/bundled/
# (manifests with their lineage, ONNX files, SHA256SUMS). Run folders are kept in runs/bundle/
# (the manifests' lineage points there); they are cleared first, so every build starts from
# scratch.
#
# BUNDLE_PIPELINE_ARGS (default `--quick`: the quick plan, about 4 minutes per dataset on 2 idle
# cores) chooses the plan, e.g. `--config training/configs/pipeline.toml` for the full one.
# Commit the code first: each manifest records the commit and whether the model code was dirty.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON_BIN:-python}"
[ -x .venv/bin/python ] && python_bin=.venv/bin/python
# shellcheck disable=SC2206  # a list of flags
pipeline_args=(${BUNDLE_PIPELINE_ARGS:---quick})
seed="${BUNDLE_SEED:-0}"
out=models_registry/bundled

scratch="$(mktemp -d -t distilcast-bundle.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
rm -rf runs/bundle
for dataset in ETTh1 ETTh2; do
    echo "build_bundle: $dataset (pipeline ${pipeline_args[*]} --seed $seed)" >&2
    "$python_bin" -m training pipeline --dataset "$dataset" --horizon 96 --seed "$seed" \
        "${pipeline_args[@]}" --registry "$scratch/registry" --work-dir "runs/bundle/$dataset"
done
"$python_bin" -m models_registry --root "$scratch/registry" export \
    --names etth1-h96,etth2-h96 --out "$scratch/bundled"
rm -rf "$out"
mv "$scratch/bundled" "$out"
"$python_bin" -m models_registry --root "$out" list
du -sh "$out" >&2
