#!/usr/bin/env bash
# Rebuild models_registry/bundled/, the models scripts/serve.sh serves on a fresh clone:
#
#   bash scripts/build_bundle.sh
#
# For ETTh1 and ETTh2 at H=96, seed 0 (BUNDLE_SEED): the seeds' chain of bench/students.py.
# Its teachers are the bench's pretrained, fine-tuned SimMTM/HiMTM/DMAE checkpoints (committed in
# bench/checkpoints/, trained by bench/teachers.py); the student is the `student` stage's run of
# that seed, distilled from their ensemble in the form and lookback chosen on validation
# (bench/results/student_choices.json), trained here when runs/students/ lacks it (about 5-25
# minutes per dataset on one CPU thread). Every model is exported to ONNX (parity-checked),
# registered in a scratch registry (the teachers, their `-ensemble` group, the student, each with
# its lineage and metrics) and promoted; `python bench/students.py bundle` then exports both
# families over models_registry/bundled/ (manifests, ONNX files, SHA256SUMS).
# Commit the code first: each manifest records the commit and whether the tree was dirty.
#
# To build a family from your own data instead, run `python -m training pipeline --quick` (or
# the full plan) into your registry: docs/own-data.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON_BIN:-python}"
[ -x .venv/bin/python ] && python_bin=.venv/bin/python
"$python_bin" bench/students.py bundle --seed "${BUNDLE_SEED:-0}" --threads "${THREADS:-1}" "$@"
"$python_bin" -m models_registry --root models_registry/bundled list
du -sh models_registry/bundled >&2
