#!/usr/bin/env bash
# Launch the forecasting service under uvicorn.
#
#   scripts/launch_service.sh [--workers N]
#
# Environment: PORT or DISTILCAST_PORT (default 8000), HOST or DISTILCAST_HOST (default 0.0.0.0),
# WORKERS or DISTILCAST_WORKERS (default: the CPU count, `nproc`; --workers wins over both),
# DISTILCAST_HEAD_TIMEOUT_S (default 10: a connection whose request head is not complete in that
# time is closed, see service/launch.py), PYTHON (default .venv/bin/python when present),
# UVICORN_ARGS (extra flags), and every DISTILCAST_* setting (service/config.py). The registry
# must hold a model (scripts/build_default_model.sh builds the default one).
# Prometheus multiprocess mode is always on: every worker writes its metrics under
# PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory unless given; emptied before start and,
# when this script created it, removed on exit) and /metrics on any worker reports them all.
# Logs: JSON lines on stderr for the app and uvicorn (DISTILCAST_LOG_LEVEL, DISTILCAST_LOG_FORMAT);
# the access log is the service's own, with request ids (DISTILCAST_ACCESS_LOG=true), so
# uvicorn's plain-text one stays off.
set -euo pipefail

cd "$(dirname "$0")/.."

workers_flag=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers_flag="${2:-}"; shift 2 || { echo "--workers needs a count" >&2; exit 2; };;
        --workers=*) workers_flag="${1#--workers=}"; shift;;
        *) echo "unknown argument: $1 (only --workers N)" >&2; exit 2;;
    esac
done

PORT="${PORT:-${DISTILCAST_PORT:-8000}}"
HOST="${HOST:-${DISTILCAST_HOST:-0.0.0.0}}"
WORKERS="${workers_flag:-${WORKERS:-${DISTILCAST_WORKERS:-$(nproc)}}}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case "$WORKERS" in ''|*[!0-9]*|0) echo "WORKERS must be a positive integer" >&2; exit 2;; esac

created_dir=""
if [[ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]]; then
    PROMETHEUS_MULTIPROC_DIR="$(mktemp -d -t distilcast-metrics.XXXXXX)"
    created_dir="$PROMETHEUS_MULTIPROC_DIR"
else
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    # Files left by an earlier run would be summed into this one's counters.
    find "$PROMETHEUS_MULTIPROC_DIR" -maxdepth 1 -name '*.db' -delete
fi
export PROMETHEUS_MULTIPROC_DIR

cleanup() {
    if [[ -n "$created_dir" ]]; then rm -rf "$created_dir"; fi
}
trap cleanup EXIT

# shellcheck disable=SC2086  # UVICORN_ARGS is a list of flags
"$PYTHON" -m service.launch service.app:app_factory --factory \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    --no-access-log --timeout-graceful-shutdown 15 ${UVICORN_ARGS:-} &
server=$!
signalled=""
forward() { signalled=1; kill -TERM "$server" 2>/dev/null || true; }
trap forward TERM INT
status=0
wait "$server" || status=$?
if [[ -n "$signalled" ]]; then
    # The trap interrupted the first wait; this one returns uvicorn's own exit status.
    status=0
    wait "$server" || status=$?
    # A single-process uvicorn re-raises the signal after its graceful shutdown (exit 128+15 or
    # 128+2); the stop was asked for and completed, so report success as the multi-worker path does.
    if [[ "$status" == 143 || "$status" == 130 ]]; then status=0; fi
fi
exit "$status"
