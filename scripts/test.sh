#!/usr/bin/env bash
# The whole test suite: set up .venv, make sure Redis answers, lint, type-check, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

export DISTILCAST_REDIS_URL="${DISTILCAST_REDIS_URL:-redis://127.0.0.1:6379/15}"
redis_ping() {
    .venv/bin/python - "$DISTILCAST_REDIS_URL" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
except Exception:
    sys.exit(1)
PY
}
if ! redis_ping; then
    if command -v redis-server >/dev/null 2>&1; then
        echo "test: no Redis answered; starting redis-server on 127.0.0.1:6379" >&2
        mkdir -p /tmp/distilcast-redis
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir /tmp/distilcast-redis --logfile /tmp/distilcast-redis/redis.log
        for _ in $(seq 50); do redis_ping && break; sleep 0.1; done
    fi
    if ! redis_ping; then
        echo "test: Redis is not reachable at $DISTILCAST_REDIS_URL; the integration tests need it" >&2
        exit 1
    fi
fi

# The dashboard test scrapes the service with a real Prometheus (Debian's package).
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing Debian's prometheus package for the dashboard test" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest "$@"
