#!/usr/bin/env bash
# GPU check of the serving core (issue 19): CUDA vs CPU parity, placement, latency and batcher
# throughput of bundled models -> bench/results/gpu.json (bench/gpu_check.py says what is measured).
#   bash bench/gpu_check.sh            (from the repo root; GPU_VENV, PYTHON override the defaults;
#                                       GPU_WHEELS=DIR installs offline from a folder of wheels)
# Without a GPU it stops with exit code 2 before creating a venv or downloading anything.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=1.31.1  # the release of the CPU build pinned in pyproject.toml
need_gpu() {
    echo "gpu_check: an NVIDIA GPU is needed ($1); no venv created, nothing downloaded," \
        "bench/results/gpu.json not written" >&2
    exit 2
}
command -v nvidia-smi >/dev/null 2>&1 || need_gpu "nvidia-smi not found"
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || need_gpu "nvidia-smi lists no GPU"
venv=${GPU_VENV:-/tmp/distilcast-gpu-venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# From a package index, or offline from a folder of wheels (GPU_WHEELS=DIR: onnxruntime-gpu, its
# CUDA 13 / cuDNN wheels, numpy, pydantic and their dependencies, for this machine's Python).
source=(--disable-pip-version-check)
[ -n "${GPU_WHEELS:-}" ] && source+=(--no-index --find-links "$GPU_WHEELS")
echo "gpu_check: installing onnxruntime-gpu==$ORT_GPU into $venv" >&2
# onnxruntime-gpu's cuda/cudnn extras bring the CUDA 13 and cuDNN runtime wheels (loaded by
# onnxruntime.preload_dlls()); docker/gpu-constraints.txt pins them, requirements.lock the rest.
if ! "$venv/bin/python" -m pip install -q "${source[@]}" -c requirements.lock \
    -c docker/gpu-constraints.txt "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU" numpy pydantic; then
    echo "gpu_check: could not install onnxruntime-gpu==$ORT_GPU and its CUDA wheels (no" \
        "package index reachable? onnxruntime-gpu's wheel alone is about 244 MiB; put the" \
        "wheels in a folder and pass GPU_WHEELS=DIR); bench/results/gpu.json not written" >&2
    exit 3
fi
PYTHONPATH=. exec "$venv/bin/python" bench/gpu_check.py "$@"
