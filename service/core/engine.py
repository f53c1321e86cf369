"""ONNX Runtime sessions: provider choice with a clean CPU fallback, and one `run` per graph."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True)
class EngineOptions:
    providers: tuple[str, ...] = ("CUDAExecutionProvider", CPU)
    intra_threads: int = 1
    inter_threads: int = 1


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's pip extras installed (the GPU
    image's way of shipping CUDA 13), once per process. Without them the CUDA session fails and
    the engine falls back to CPU, as it does for any CUDA failure."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:  # noqa: BLE001 - a missing library shows up as the CPU fallback below
        log.warning("onnxruntime.preload_dlls() failed; CUDA sessions may fall back to CPU",
                    exc_info=True)


def choose_providers(preferred: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this build has, in order, always ending with the CPU provider."""
    chosen = [p for p in preferred if p in available and p != CPU]
    chosen.append(CPU)
    return chosen


class OrtEngine:
    """One ONNX graph in one InferenceSession. `run` is thread-safe (ORT sessions are).

    `provider` is the provider ONNX Runtime actually placed the session on, which is what the
    observer and `/v1/models` report: a CUDA request on a machine without a usable GPU reads CPU
    there.
    """

    def __init__(self, onnx_bytes: bytes, options: EngineOptions, *, label: str = "") -> None:
        self.label = label
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = options.intra_threads
        so.inter_op_num_threads = options.inter_threads
        # Spinning workers burn the core the event loop needs between small calls.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        wanted = choose_providers(options.providers, ort.get_available_providers())
        if wanted[0] == "CUDAExecutionProvider":
            _preload_cuda_libraries()
        try:
            session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=wanted)
        except Exception:
            if wanted == [CPU]:
                raise
            log.warning("session %s on %s failed; falling back to CPU", label, wanted[0],
                        exc_info=True)
            session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=[CPU])
        self._session = session
        self.provider: str = session.get_providers()[0]
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{label}: expected one input and at least one output")
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self._outputs = [self.output_name]

    def run(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [B, L, C] -> float32 [B, H, C]."""
        out = self._session.run(self._outputs, {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)
