"""Split-conformal intervals cover the ETTh1 test split within 3 points of the level.

By default the served model is a naive last-value forecaster calibrated on the ETTh1 validation
split exactly as the contract says (docs/contracts.md, Calibration): coverage does not depend on
the model being good. Set DISTILCAST_TEST_MODEL_DIR to a real exported student - a version
directory (model.onnx + manifest.json) or a registry root (then DISTILCAST_TEST_MODEL names the
student, default the only one) - to check that model's own calibration instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models_registry.manifest import Manifest
from models_registry.store import FilesystemStore
from tests.service.conftest import serving
from tests.service.onnx_models import conformal_calibration, linear_bytes, manifest

ROOT = Path(__file__).resolve().parents[2]
ETTH1 = ROOT / "data" / "ETTh1.csv"
LEVELS = (80, 90, 95)
STRIDE = 24  # test windows a day apart keep the request small


def load(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 8)).astype(np.float32)


def windows(data: np.ndarray, start: int, end: int, lookback: int, horizon: int,
            stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(start, end - lookback - horizon + 1, stride)
    x = np.stack([data[i : i + lookback] for i in idx])  # [N, L, C]
    y = np.stack([data[i + lookback : i + lookback + horizon] for i in idx])  # [N, H, C]
    return x, y


def naive_registry(root: Path, data: np.ndarray) -> tuple[str, Manifest]:
    lookback, horizon = 336, 96
    xv, yv = windows(data, 8640 - lookback, 11520, lookback, horizon)
    s = np.sqrt(xv.var(axis=1) + 1e-5)[:, None, :]  # [N, 1, C]
    scores = np.abs(yv - xv[:, -1:, :]) / s  # last-value forecast
    calibration = conformal_calibration(scores.transpose(0, 2, 1).reshape(-1, horizon))
    store = FilesystemStore(root)
    m = store.register(manifest("etth1-naive", "student", lookback, horizon,
                                architecture="last-value", calibration=calibration),
                       linear_bytes(lookback, horizon))
    return m.name, m


def real_registry(root: Path, model_dir: Path) -> tuple[str, Manifest]:
    if (model_dir / "manifest.json").is_file():
        m = Manifest.model_validate_json((model_dir / "manifest.json").read_text())
        store = FilesystemStore(root)
        m = store.register(m, (model_dir / "model.onnx").read_bytes())
        return m.name, m
    store = FilesystemStore(model_dir)
    name = os.environ.get("DISTILCAST_TEST_MODEL") or next(
        n for n in store.list_models()
        if store.manifest(n, store.latest_version(n)).kind == "student")
    name, version = store.resolve(name)
    return name, store.manifest(name, version)


@pytest.mark.slow
def test_interval_coverage_on_the_etth1_test_split(tmp_path: Path) -> None:
    data = load(ETTH1)
    model_dir = os.environ.get("DISTILCAST_TEST_MODEL_DIR")
    if model_dir:
        name, m = real_registry(tmp_path, Path(model_dir))
        root = tmp_path if (Path(model_dir) / "manifest.json").is_file() else Path(model_dir)
    else:
        name, m = naive_registry(tmp_path, data)
        root = tmp_path
    assert m.calibration is not None
    test_border = (m.dataset.split_borders.get("test") if m.dataset else None) or (
        11520 - m.lookback, 14400)
    if m.channels == 1:
        data = data[:, -1:]  # univariate models forecast OT
    x, y = windows(data, test_border[0], test_border[1], m.lookback, m.horizon, STRIDE)
    n, lookback, channels = x.shape
    body = {"model": name, "mode": "fast", "level": list(LEVELS),
            "ids": list(range(n)), "sizes": [lookback] * n, "n_channels": channels,
            "values": x.reshape(-1).tolist()}
    with serving(registry_root=root, models=(name,)) as s, s.client(timeout=120) as c:
        r = c.post("/v1/forecast/batch", json=body)
    assert r.status_code == 200, r.text[:500]
    forecasts = r.json()["forecasts"]
    for level in LEVELS:
        lower = np.array([f["intervals"][str(level)]["lower"] for f in forecasts])
        upper = np.array([f["intervals"][str(level)]["upper"] for f in forecasts])
        coverage = 100.0 * ((y >= lower) & (y <= upper)).mean()
        assert abs(coverage - level) <= 3.0, (level, coverage)
