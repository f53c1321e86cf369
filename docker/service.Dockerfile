# Serving image: FastAPI + ONNX Runtime on CPU, no torch. Multi-stage: the builder resolves the
# pinned wheels into a virtualenv; the runtime stage copies only that venv and the code.
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml requirements.lock README.md ./
COPY models_registry ./models_registry
COPY service ./service
COPY training ./training
# Serving dependencies only (the `train` extra, with torch, is not installed).
RUN /opt/venv/bin/pip install -c requirements.lock .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DISTILCAST_REGISTRY_ROOT=/var/lib/distilcast/registry \
    DISTILCAST_PORT=8000
RUN groupadd --system --gid 10001 distilcast \
    && useradd --system --uid 10001 --gid distilcast --home-dir /app --shell /usr/sbin/nologin distilcast \
    && mkdir -p /var/lib/distilcast/registry \
    && chown -R distilcast:distilcast /var/lib/distilcast
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY --chown=distilcast:distilcast scripts/launch_service.sh ./scripts/launch_service.sh
USER distilcast
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DISTILCAST_PORT', '8000'), timeout=2)"]
# The same launch script that `scripts/serve.sh` (the README's main command) ends with: one
# uvicorn worker per CPU the container sees (`nproc`); DISTILCAST_WORKERS=N, or the command
# `bash scripts/launch_service.sh --workers N`, sets the count.
CMD ["bash", "scripts/launch_service.sh"]
