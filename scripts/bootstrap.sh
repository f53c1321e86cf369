#!/usr/bin/env bash
# Create ./.venv and install Distilcast with every pinned dependency (requirements.lock as
# constraints). Idempotent: it reinstalls only when pyproject.toml or requirements.lock changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${DISTILCAST_EXTRAS:-train,dev,batch,otel,peers}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: Python >= 3.11 is required ($python_bin is $("$python_bin" -V 2>&1))" >&2
    exit 1
fi

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.distilcast-installed
want="$(cat pyproject.toml client/pyproject.toml requirements.lock | sha256sum | cut -c1-64) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing pinned dependencies into .venv (extras: $extras)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -c requirements.lock -e ".[$extras]" -e "./client[plot]"
    echo "$want" > "$stamp"
fi
