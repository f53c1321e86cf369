#!/usr/bin/env bash
# Start the teacher queue (bench/teachers.py) as two background jobs, one thread each, for one
# session: on one core the pretraining runs and the fine-tuning protocol runs that each finished
# pretraining unlocks; on the other the fine-tuning, ensemble and PatchTST runs. Both append
# their records under a file lock; each stops between epochs after TIME_LIMIT seconds, and the
# next invocation resumes where it stopped.
#
#   bash bench/teachers_background.sh [LOG_DIR (default: var/logs)] [TIME_LIMIT (default: 9500)]
#   .venv/bin/python bench/teachers.py status      # what is done, unfinished and left
#
# Pause them while timing anything else: pkill -STOP -f bench/teachers.py (-CONT to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
logs="${1:-var/logs}"
limit="${2:-9500}"
mkdir -p "$logs"
py=.venv/bin/python
if pgrep -f "bench/teachers.py run" > /dev/null; then
    echo "teacher jobs are already running:" >&2
    pgrep -af "bench/teachers.py run" >&2
    exit 1
fi
export OMP_NUM_THREADS=1
nohup "$py" bench/teachers.py run --stages protocol,pretrain --threads 1 \
    --time-limit "$limit" --no-progress > "$logs/teachers-pretrain.log" 2>&1 &
echo "pretraining and protocol runs: pid $! (log $logs/teachers-pretrain.log)"
nohup "$py" bench/teachers.py run --stages finetune,ensemble,supervised --threads 1 \
    --time-limit "$limit" --no-progress > "$logs/teachers-finetune.log" 2>&1 &
echo "fine-tuning, ensembles, PatchTST: pid $! (log $logs/teachers-finetune.log)"
