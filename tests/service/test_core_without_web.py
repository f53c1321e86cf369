"""The inference core and the batch package work where no web stack is installed (the Ray job).

A fresh interpreter with FastAPI, starlette, prometheus-client, torch and the web layer of the
service blocked (a `sys.meta_path` finder that raises ImportError for them) imports every module
of `service.core` and `service.batch`, pins the model for each mode with the batch job's rules,
and scores one window through the service's `ModelPool` + `Predictor` on a real ONNX Runtime
session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.service.onnx_models import build_registry

ROOT = Path(__file__).resolve().parents[2]
NAME = "etth1-h96"
LOOKBACK, HORIZON = 32, 8

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = ("fastapi", "starlette", "prometheus_client", "torch", "uvicorn",
               "service.api", "service.metrics", "service.app")

    def blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import fastapi  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not block")

    import asyncio
    import json
    import numpy as np
    import service.batch
    import service.core
    from models_registry.store import FilesystemStore

    modules = ["service.batch_job"]
    for package in (service.core, service.batch):
        modules += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for name in modules:
        importlib.import_module(name)

    from service.batch.target import pin_model
    from service.core.engine import EngineOptions
    from service.core.pool import ModelPool, PoolOptions
    from service.core.predictor import Predictor
    from service.core.types import ForecastRequest, SeriesInput

    root, name = sys.argv[1], sys.argv[2]
    store = FilesystemStore(root)
    pins = {mode: pin_model(store, name, mode).label for mode in ("fast", "accurate")}
    window = np.load(sys.argv[3])

    async def score():
        pool = ModelPool(store_registry(root), PoolOptions(
            engine=EngineOptions(providers=("CPUExecutionProvider",))))
        await pool.start()
        predictor = Predictor(pool)
        out = {}
        for mode in ("fast", "accurate"):
            req = ForecastRequest([SeriesInput("w", window, False, 0)], model=name, mode=mode)
            result = await predictor.forecast(req)
            out[mode] = {"label": f"{result.model}@{result.version}",
                         "provider": result.provider,
                         "values": result.results[0].values.tolist()}
        await predictor.close()
        await pool.close(1.0)
        return out

    def store_registry(root):
        from models_registry.registry import open_registry
        return open_registry(root)

    scored = asyncio.run(score())
    leaked = sorted(m for m in sys.modules if blocked(m))
    print(json.dumps({"modules": len(modules), "pins": pins, "scored": scored,
                      "leaked": leaked}))
    """
)


def test_core_and_batch_import_and_score_without_fastapi(tmp_path: Path) -> None:
    build_registry(tmp_path / "registry", NAME, LOOKBACK, HORIZON)
    window = np.random.default_rng(0).normal(size=(LOOKBACK, 3)).astype(np.float32)
    np.save(tmp_path / "window.npy", window)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "registry"), NAME,
         str(tmp_path / "window.npy")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    assert out["modules"] >= 10  # every core and batch module was imported
    assert out["pins"] == {"fast": f"{NAME}@1", "accurate": f"{NAME}-ensemble@1"}
    fast, accurate = out["scored"]["fast"], out["scored"]["accurate"]
    assert fast["label"] == out["pins"]["fast"] and fast["provider"] == "CPUExecutionProvider"
    assert accurate["label"] == out["pins"]["accurate"]
    # The fixture student forecasts the last value; the ensemble averages the window mean and
    # last value + 1 (tests/service/onnx_models.py).
    expected_fast = np.repeat(window[-1:], HORIZON, axis=0)
    np.testing.assert_allclose(fast["values"], expected_fast, rtol=1e-6)
    expected_accurate = np.repeat(((window.mean(0) + window[-1] + 1.0) / 2)[None], HORIZON, 0)
    np.testing.assert_allclose(accurate["values"], expected_accurate, rtol=1e-5, atol=1e-6)
