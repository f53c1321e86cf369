# Training image: torch and the whole offline pipeline. The compose `train` service runs it once to
# build the default model into the shared registry volume.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DISTILCAST_REGISTRY_ROOT=/var/lib/distilcast/registry
WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY models_registry ./models_registry
COPY service ./service
COPY training ./training
COPY data ./data
COPY scripts ./scripts
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -c requirements.lock ".[train]"
ENV PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 distilcast \
    && useradd --system --uid 10001 --gid distilcast --home-dir /app --shell /usr/sbin/nologin distilcast \
    && mkdir -p /var/lib/distilcast/registry /app/runs \
    && chown -R distilcast:distilcast /var/lib/distilcast /app/runs
USER distilcast
# Builds the default model only when the registry has none (same rule as scripts/serve.sh).
CMD ["bash", "scripts/build_default_model.sh"]
