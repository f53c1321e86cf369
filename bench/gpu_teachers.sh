#!/usr/bin/env bash
# The teacher queue on a GPU machine for a bounded time (one device call): runs
# bench/teachers_parallel.py with --device cuda and packs what a later session needs into $OUT
# (at most eight files). To merge, unpack them into a scratch folder (`tar -xf` each) and copy its
# bench/results/*.json and bench/checkpoints/* over the checkout's: the call started from this
# checkout's records, so its records are a superset of them (bench/README.md).
#
#   OUT=/some/dir DEADLINE=540 JOBS=14 bash bench/gpu_teachers.sh [extra teachers_parallel args]
#
# The machine's own python3 (with a CUDA torch) runs it; the repository's data/ CSVs stand in for
# the data folder the records name (/work/shared/data), so resumed runs see the same settings.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the packed results}"
deadline="${DEADLINE:-540}"
jobs="${JOBS:-14}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
data=/work/shared/data
if [ ! -e "$data/ETTh1.csv" ]; then
    mkdir -p "$data" && cp data/ETTh1.csv data/ETTh2.csv "$data/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version.split()[0]); sys.exit(0 if torch.cuda.is_available() else 3)" || exit 3
"$py" bench/teachers_parallel.py --device cuda --jobs "$jobs" --deadline "$deadline" \
    --data-dir "$data" --logs var/logs/teachers-parallel --pack "$OUT" "$@" 2>&1 | tee "$OUT/driver.log"
