"""The bundled models (models_registry/bundled/) score on the test split what their manifests say.

Inference only: each student and each teacher ONNX file runs in a real onnxruntime session over
every window of its dataset's test split (raw values in, raw forecasts out, as the service runs
them); the ensemble is the mean of its members' forecasts. The MSE on the z-scored scale must
match the manifest's ``test_mse`` within 1e-4.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models_registry.bundle import BUNDLED_DIR
from models_registry.manifest import Manifest
from models_registry.store import FilesystemStore
from training.data import DataConfig, PreparedData, prepare
from training.manifests import file_sha256

BUNDLED = ("etth1-h96", "etth2-h96")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundle() -> FilesystemStore:
    return FilesystemStore(BUNDLED_DIR)


def _forecast(store: FilesystemStore, m: Manifest, x_raw: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        store.onnx_bytes(m.name, m.version), options, providers=["CPUExecutionProvider"]
    )
    out = [
        session.run([m.output_name], {m.input_name: x_raw[i : i + 256]})[0]
        for i in range(0, len(x_raw), 256)
    ]
    return np.concatenate(out)


def _test_split(m: Manifest) -> tuple[PreparedData, np.ndarray, np.ndarray]:
    """The test windows of the data the manifest names: raw inputs and z-scored targets."""
    assert m.dataset is not None and m.lineage is not None
    data = prepare(DataConfig(m.dataset.name, lookback=m.lookback, horizon=m.horizon))
    # The bytes scored are the bytes trained on.
    assert (data.path.name, m.lineage.data_file) == (m.dataset.file, data.path.name)
    assert file_sha256(data.path) == m.lineage.data_sha256
    windows = data.splits["test"]
    x, y = windows.batch(windows.batches(len(windows))[0])
    x_raw = x.numpy() * data.scaler.std + data.scaler.mean
    return data, x_raw.astype(np.float32), y.numpy()


def _mse(yhat_raw: np.ndarray, y_z: np.ndarray, data: PreparedData) -> float:
    yhat_z = (yhat_raw.astype(np.float64) - data.scaler.mean) / data.scaler.std
    return float(np.mean((yhat_z - y_z.astype(np.float64)) ** 2))


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_student_and_ensemble_score_their_manifests(
    bundle: FilesystemStore, name: str
) -> None:
    student = bundle.manifest(*bundle.resolve(f"{name}@production"))
    assert student.kind == "student" and student.lineage is not None
    assert student.lineage.git_commit and student.lineage.seed is not None
    group_ref = next(r for r in student.teachers if r.name == f"{name}-ensemble")
    group = bundle.manifest(group_ref.name, group_ref.version)
    assert bundle.resolve(f"{name}-ensemble@production") == (group.name, group.version)
    assert group.members and all(r in student.teachers for r in group.members)

    data, x_raw, y_z = _test_split(student)
    assert len(x_raw) == len(data.splits["test"]) > 2000  # every test window
    got = _mse(_forecast(bundle, student, x_raw), y_z, data)
    assert got == pytest.approx(student.metrics["test_mse"], abs=TOLERANCE)

    members = [bundle.manifest(r.name, r.version) for r in group.members]
    forecasts = []
    for member in members:
        m_x = x_raw
        if member.lookback != student.lookback:  # same target windows, longer inputs
            _, m_x, m_y = _test_split(member)
            np.testing.assert_array_equal(m_y, y_z)
        yhat = _forecast(bundle, member, m_x)
        assert _mse(yhat, y_z, data) == pytest.approx(member.metrics["test_mse"], abs=TOLERANCE)
        forecasts.append(yhat.astype(np.float64))
    got = _mse(np.mean(forecasts, axis=0), y_z, data)
    assert got == pytest.approx(group.metrics["test_mse"], abs=TOLERANCE)
