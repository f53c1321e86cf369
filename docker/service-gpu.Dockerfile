# GPU serving image: onnxruntime-gpu, so the teacher ensemble (accurate path) runs on the CUDA
# execution provider. Without a visible GPU the service falls back to CPU by itself.
# onnxruntime-gpu 1.31.1 is built for CUDA 13: its cuda/cudnn extras install the CUDA 13 and cuDNN
# runtime wheels (pinned in docker/gpu-constraints.txt) and ONNX Runtime loads them from there, so
# the base image only needs the NVIDIA container setup; the host needs a driver >= 580.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS runtime
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml requirements.lock README.md docker/gpu-constraints.txt ./
COPY models_registry ./models_registry
COPY service ./service
COPY training ./training
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -c requirements.lock . \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install -c gpu-constraints.txt "onnxruntime-gpu[cuda,cudnn]==1.31.1"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DISTILCAST_REGISTRY_ROOT=/var/lib/distilcast/registry \
    DISTILCAST_PORT=8000 \
    DISTILCAST_WORKERS=1 \
    DISTILCAST_PROVIDERS='["CUDAExecutionProvider","CPUExecutionProvider"]'
RUN groupadd --system --gid 10001 distilcast \
    && useradd --system --uid 10001 --gid distilcast --home-dir /app --shell /usr/sbin/nologin distilcast \
    && mkdir -p /var/lib/distilcast/registry \
    && chown -R distilcast:distilcast /var/lib/distilcast
COPY --chown=distilcast:distilcast scripts/launch_service.sh ./scripts/launch_service.sh
USER distilcast
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DISTILCAST_PORT', '8000'), timeout=2)"]
CMD ["bash", "scripts/launch_service.sh"]
