"""ONNX export: parity for every model in the dict, refusal of bad graphs, manifests, registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper

from models_registry.defaults import registry_root
from models_registry.manifest import ModelRef
from models_registry.store import FilesystemStore
from tests.training.test_models import TINY
from training import export, manifests
from training.cli import main
from training.config import build_run_config
from training.data import DataConfig, prepare
from training.export import (
    OPSET,
    ParityError,
    check_parity,
    onnx_session,
    parity_tolerance,
    raw_windows,
)
from training.manifests import (
    CALIBRATION_LEVELS,
    ExportedModel,
    conformal_quantiles,
    export_model,
    export_run,
)
from training.models import MODELS, build_model
from training.publish import register_ensemble, register_exported, register_run
from training.train import run_train

L, H = 48, 12
QUICK = {"epochs": 1, "batch_size": 64, "max_train_batches": 4, "progress": False, "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data():
    return prepare(DataConfig("ETTh1", lookback=L, horizon=H))


def _train(arch: str, out: Path, **model: object) -> Path:
    cfg = build_run_config(
        arch,
        data={"dataset": "ETTh1", "lookback": L, "horizon": H},
        train=QUICK,
        model_settings={**TINY[arch], **model},
        out_dir=str(out),
    )
    return run_train(cfg).out_dir


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("mlp", tmp_path_factory.mktemp("runs") / "mlp")


@pytest.fixture(scope="module")
def exported(mlp_run: Path, data) -> ExportedModel:
    """One export of the trained run, shared by the tests that only read it (exports are slow)."""
    return export_run(mlp_run, "etth1-h12", data=data, parity_windows=32)


def _torch_raw(model: torch.nn.Module, x_raw: torch.Tensor, data) -> np.ndarray:
    """The forecast the model was evaluated with (z-scored in, de-normalised out)."""
    mean, std = torch.from_numpy(data.scaler.mean), torch.from_numpy(data.scaler.std)
    with torch.no_grad():
        return (model((x_raw - mean) / std) * std + mean).numpy()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exports_with_parity(name: str, data, tmp_path: Path) -> None:
    model = build_model(name, lookback=L, horizon=H, **TINY[name]).eval()
    out = tmp_path / "model.onnx"
    e = export_model(model, data, name=f"t-{name}", architecture=name, parity_windows=64, path=out)
    assert out.read_bytes() == e.onnx_bytes
    assert e.parity.max_abs_err <= 1e-4 and e.manifest.parity_max_abs_err == e.parity.max_abs_err
    assert {"windows", "batch_1"} <= set(e.parity.checks)

    proto = onnx.load_from_string(e.onnx_bytes)
    assert {o.domain: o.version for o in proto.opset_import}.get("") == OPSET
    session = onnx_session(e.onnx_bytes, threads=1)
    ch = "channels" if model.channel_independent else data.channels
    assert session.get_inputs()[0].name == "x" and session.get_outputs()[0].name == "y"
    assert session.get_inputs()[0].shape == ["batch", L, ch]
    assert session.get_outputs()[0].shape == ["batch", H, ch]

    # Raw windows in, raw forecasts out: a batch size the export never saw.
    x = raw_windows(data, "test", 5)
    (y,) = session.run(["y"], {"x": x.numpy()})
    want = _torch_raw(model, x, data)
    assert y.shape == (5, H, data.channels)
    np.testing.assert_allclose(y, want, atol=1e-4 * data.scaler.std.max(), rtol=1e-4)
    if model.channel_independent:
        assert e.manifest.channels is None and {"channels_1", "channels_x2"} <= set(e.parity.checks)
        three = x[..., [6, 0, 3]]  # another channel count, in another order
        (y3,) = session.run(["y"], {"x": three.numpy()})
        np.testing.assert_allclose(y3, y[..., [6, 0, 3]], rtol=1e-4, atol=1e-3)
    else:
        assert e.manifest.channels == data.channels


def test_model_without_scale_equivariance_is_served_through_the_train_scaler(data) -> None:
    model = build_model("mlp", lookback=L, horizon=H, hidden=32, norm="mean").eval()
    assert not model.scale_equivariant
    e = export_model(model, data, name="t-mean", architecture="mlp", parity_windows=32)
    norm = e.manifest.normalisation
    assert norm["method"] == "train_scaler" and not norm["scale_equivariant"]
    assert norm["train_scaler"]["std"] == pytest.approx(data.scaler.std.tolist())
    assert e.manifest.channels == data.channels  # the scaler pins the channel count
    assert e.manifest.input_shape == ["batch", L, data.channels]
    x = raw_windows(data, "test", 4)
    (y,) = onnx_session(e.onnx_bytes, 1).run(["y"], {"x": x.numpy()})
    np.testing.assert_allclose(y, _torch_raw(model, x, data), rtol=1e-4, atol=1e-3)


def _tampered_export(real):
    """An exporter whose graph has one weight nudged: a graph that disagrees with torch."""

    def tampered(*args, **kwargs) -> bytes:
        proto = onnx.load_from_string(real(*args, **kwargs))
        for init in proto.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype == np.float32 and w.ndim == 2:
                init.CopyFrom(numpy_helper.from_array(w + 0.05, init.name))
                break
        return proto.SerializeToString()

    return tampered


def test_a_graph_that_disagrees_with_torch_is_refused(
    mlp_run: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FilesystemStore(tmp_path / "registry")
    monkeypatch.setattr(manifests, "export_onnx", _tampered_export(export.export_onnx))
    with pytest.raises(ParityError, match="parity check failed") as info:
        register_run(mlp_run, store, "etth1-h12", data=data, parity_windows=32)
    assert info.value.max_abs_err > 1e-4
    assert store.list_models() == []  # nothing was registered


def test_the_threshold_is_enforced(exported: ExportedModel, data) -> None:
    x = raw_windows(data, "test", 8)
    args = (exported.onnx_bytes, exported.graph.module, x, data.scaler.std)
    assert check_parity(*args, dynamic_channels=True).max_abs_err <= 1e-4
    with pytest.raises(ParityError, match="refusing to register"):
        check_parity(*args, dynamic_channels=True, tolerance=0.0)


def test_manifest_fields(mlp_run: Path, exported: ExportedModel, data) -> None:
    run = json.loads((mlp_run / "run.json").read_text())
    m = exported.manifest
    assert (m.name, m.kind, m.architecture) == ("etth1-h12", "student", "mlp")
    assert m.config == run["model_config"]
    assert (m.lookback, m.horizon, m.channels) == (L, H, None)
    assert m.input_shape == ["batch", L, "channels"] and m.output_shape == ["batch", H, "channels"]
    assert (m.input_name, m.output_name, m.opset) == ("x", "y", OPSET)
    assert m.normalisation["input"] == "raw" and m.normalisation["scale_equivariant"]
    assert m.dataset is not None and m.dataset.name == "ETTh1"
    assert m.dataset.split_borders["train"] == (0, 8640)
    assert m.dataset.features == list(data.columns)
    assert m.frequency == "h"
    assert m.metrics["test_mse"] == pytest.approx(run["test"]["mse"])
    assert {"val_mse", "val_mae", "test_mse", "test_mae", "test_mse_raw"} <= set(m.metrics)
    assert m.parity_max_abs_err is not None and m.parity_max_abs_err <= 1e-4
    assert m.code_version and m.created_at is not None
    # Lineage: the checkout, the seed, the data file's bytes and the run folder.
    lin = m.lineage
    assert lin is not None
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=True).stdout.strip()
    assert lin.git_commit == head and lin.git_dirty is not None
    assert lin.seed == run["train"]["seed"] and lin.train == run["train"]
    assert lin.data_file == "ETTh1.csv" == data.path.name
    assert lin.data_sha256 == hashlib.sha256(data.path.read_bytes()).hexdigest()
    assert lin.run_dir is not None and Path(lin.run_dir).resolve() == mlp_run.resolve()
    cal = m.calibration
    assert cal is not None and cal.levels == list(CALIBRATION_LEVELS)
    assert np.asarray(cal.quantiles).shape == (50, H)
    assert cal.n == len(data.splits["val"]) * data.channels
    assert np.all(np.diff(np.asarray(cal.quantiles), axis=0) >= 0)


def test_conformal_quantiles_use_the_finite_sample_rank() -> None:
    scores = np.tile(np.arange(1.0, 10.0)[::-1, None], (1, 2))  # 9 scores per step, unsorted
    q = conformal_quantiles(scores, [50, 80, 90, 95])
    # ceil(10 * p): the 5th, 8th, 9th smallest; 95% needs the 10th of 9 -> clamped to the max.
    assert [row[0] for row in q] == [5.0, 8.0, 9.0, 9.0]


def test_export_register_load_from_registry_bytes(
    mlp_run: Path, exported: ExportedModel, data, tmp_path: Path
) -> None:
    store = FilesystemStore(tmp_path / "registry")
    m = register_exported(exported, store, alias="production")
    assert m.version == 1 and m.sha256
    assert store.resolve("etth1-h12") == ("etth1-h12", 1)
    assert store.aliases("etth1-h12") == {"production": 1, "staging": 1}
    session = onnx_session(store.onnx_bytes("etth1-h12", 1), threads=1)
    x = raw_windows(data, "test", 16)
    (y,) = session.run([m.output_name], {m.input_name: x.numpy()})
    from training.checkpoints import load_forecaster

    model, _ = load_forecaster(mlp_run)
    want = _torch_raw(model, x, data)
    # Within the parity figure on the z-scored scale.
    assert np.max(np.abs(y - want) / data.scaler.std) <= 1e-4


def test_ensemble_group_with_metrics_and_calibration(
    exported: ExportedModel, data, tmp_path: Path
) -> None:
    store = FilesystemStore(tmp_path / "registry")
    e = exported
    refs = [
        store.register(e.manifest.model_copy(update={"name": n}), e.onnx_bytes).ref
        for n in ("fam-a", "fam-b")
    ]
    g = register_ensemble(
        store,
        "fam-ensemble",
        refs,
        modules=[e.graph.module, e.graph.module],
        data=data,
        val_forecasts=[e.val, e.val],
        alias="production",
    )
    assert g.kind == "ensemble" and g.members == refs and (g.lookback, g.horizon) == (L, H)
    assert g.channels is None
    # Two copies of one model: the ensemble forecasts exactly like it.
    assert g.metrics["test_mse"] == pytest.approx(e.manifest.metrics["test_mse"], rel=1e-5)
    assert g.metrics["val_mse"] == pytest.approx(e.manifest.metrics["val_mse"], rel=1e-5)
    assert g.calibration is not None and np.asarray(g.calibration.quantiles).shape == (50, H)
    assert store.resolve("fam-ensemble") == ("fam-ensemble", 1)
    assert ModelRef(name="fam-a", version=1) in store.manifest("fam-ensemble", 1).members
    # The group's lineage: the checkout and the data (seeds and runs are the members').
    lin = g.lineage
    assert lin is not None and e.manifest.lineage is not None
    assert lin.git_commit == e.manifest.lineage.git_commit and lin.git_commit is not None
    assert lin.data_sha256 == e.manifest.lineage.data_sha256 and lin.data_file == "ETTh1.csv"
    assert lin.seed is None and lin.run_dir is None


def test_cli_export(mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    argv = ["export", "--run", str(mlp_run), "--name", "cli-h12", "--registry", str(root)]
    assert main([*argv, "--alias", "staging", "--parity-windows", "16"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "cli-h12" and out["version"] == 1 and out["alias"] == "staging"
    assert out["parity_max_abs_err"] <= 1e-4
    assert FilesystemStore(root).aliases("cli-h12") == {"staging": 1}


def test_registry_root_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILCAST_REGISTRY_ROOT", raising=False)
    assert registry_root() == Path("./var/registry")
    monkeypatch.setenv("DISTILCAST_REGISTRY_ROOT", "/srv/reg")
    assert registry_root() == Path("/srv/reg")
    assert registry_root("elsewhere") == Path("elsewhere")


def test_parity_tolerance_grows_with_conditioning_depth_and_length() -> None:
    base = parity_tolerance(4, 336, 10.0)
    assert 1e-4 < base < 1e-3  # ETTh1-like graphs: honest float32 errors are 2e-6 to 6e-5
    assert parity_tolerance(4, 336, 1e4) > 100 * base  # a level that dwarfs its spread
    assert parity_tolerance(8, 336, 10.0) > base and parity_tolerance(4, 1344, 10.0) > base


def test_wide_ranging_channels_pass_parity_in_the_normalised_space(tmp_path: Path) -> None:
    """A meter reading ~1e4 that moves by ~1: float32 cannot hold 1e-4 of its train std, yet
    in the model's normalised space the graph agrees with torch within the derived tolerance."""
    rows = 600
    t = np.arange(rows)
    frame = pd.DataFrame(
        {
            "date": pd.date_range("2024-01-01", periods=rows, freq="h"),
            "meter": 20000.0 + np.sin(2 * np.pi * t / 24) + 0.001 * t,
            "other": np.cos(2 * np.pi * t / 12),
        }
    )
    csv = tmp_path / "wide.csv"
    frame.to_csv(csv, index=False)
    data = prepare(DataConfig(str(csv), lookback=L, horizon=H))
    torch.manual_seed(0)
    model = build_model("patchtst", lookback=L, horizon=H, **TINY["patchtst"])
    e = export_model(model, data, name="wide", architecture="patchtst", parity_windows=64)
    assert e.parity.max_abs_err <= e.parity.tolerance
