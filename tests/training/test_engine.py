"""The fit loop: checkpoints, early stopping, resume, evaluation protocol, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import build_run_config
from training.data import DataConfig, prepare
from training.engine import TrainConfig, evaluate, fit, predict
from training.models import build_model

REPO = Path(__file__).resolve().parents[2]
QUICK = TrainConfig(epochs=2, batch_size=64, max_train_batches=6, progress=False, threads=1)


@pytest.fixture(scope="module")
def data():
    return prepare(DataConfig("ETTh1", lookback=48, horizon=12))


def test_fit_writes_checkpoint_and_run_json(tmp_path: Path, data) -> None:
    model = build_model("mlp", lookback=48, horizon=12, hidden=16)
    result = fit(model, data, QUICK, tmp_path, run_info={"model": "mlp"})
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["model"] == "mlp" and len(run["history"]) == 2
    assert run["test"]["windows"] == len(data.splits["test"])
    weights = load_file(tmp_path / "best.safetensors")
    assert set(weights) == set(model.state_dict())
    # The reported test figures are those of the saved best weights over every test window, and
    # the raw-scale MSE weights each channel's squared error by its train variance.
    best = build_model("mlp", lookback=48, horizon=12, hidden=16)
    best.load_state_dict(weights)
    pred, true = predict(best, data.splits["test"])
    err = (pred - true).double()
    assert result.test["mse"] == pytest.approx(float((err**2).mean()), rel=1e-6)
    std = torch.from_numpy(data.scaler.std).double()
    assert result.test["mse_raw"] == pytest.approx(float((err**2 * std**2).mean()), rel=1e-6)
    assert result.test["mse_raw"] != pytest.approx(result.test["mse"], rel=1e-3)


def test_evaluation_uses_every_test_window_and_raw_scale(data) -> None:
    model = build_model("mlp", lookback=48, horizon=12, hidden=16)
    m = evaluate(model, data.splits["test"], data.scaler, batch_size=1000)
    assert m["windows"] == len(data.splits["test"])
    # Raw-scale MSE weights each channel's error by its variance.
    assert m["mse_raw"] != pytest.approx(m["mse"])


def test_same_seed_same_result(tmp_path: Path, data) -> None:
    runs = []
    for i in range(2):
        torch.manual_seed(123)
        model = build_model("mlp", lookback=48, horizon=12, hidden=16)
        torch.rand(10 + i)  # the fit must reseed, whatever was drawn since
        runs.append(fit(model, data, QUICK, tmp_path / str(i)).test["mse"])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_early_stopping_stops_after_patience(tmp_path: Path, data) -> None:
    cfg = TrainConfig(
        epochs=20,
        lr=10.0,
        lr_schedule="constant",
        batch_size=64,
        max_train_batches=2,
        patience=1,
        progress=False,
        threads=1,
    )
    model = build_model("mlp", lookback=48, horizon=12, hidden=16)
    result = fit(model, data, cfg, tmp_path)
    assert result.epochs_run < 20 and result.epochs_run == result.best_epoch + 1


def test_run_config_from_toml_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nhidden = 64\n[train]\nepochs = 7\n[data]\nlookback = 96\n")
    cfg = build_run_config("mlp", toml, data={"horizon": 24}, train={"lr": 0.5})
    assert cfg.model_settings == {"hidden": 64}
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.lookback, cfg.data.horizon) == (7, 0.5, 96, 24)
    toml.write_text("[train]\nepoch = 7\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epoch'\]"):
        build_run_config("mlp", toml)


def test_cli_train_prints_progress_and_a_json_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--model",
            "mlp",
            "--dataset",
            "ETTh1",
            "--lookback",
            "48",
            "--horizon",
            "12",
            "--epochs",
            "1",
            "--max-train-batches",
            "3",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"mse", "mae", "mse_raw", "mae_raw", "train_seconds"} <= set(result)
    assert "epoch 1" in proc.stderr


def test_cli_bad_data_exits_2_with_the_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--model",
            "mlp",
            "--dataset",
            str(tmp_path / "nothing.csv"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "nothing.csv: file not found" in proc.stderr


def test_load_forecaster_round_trip(tmp_path: Path, data) -> None:
    from training.checkpoints import load_forecaster
    from training.config import build_run_config
    from training.train import run_train

    cfg = build_run_config(
        "mlp",
        data={"dataset": "ETTh1", "lookback": 48, "horizon": 12},
        model_settings={"hidden": 16},
        train={"epochs": 1, "max_train_batches": 2, "progress": False},
        out_dir=str(tmp_path),
    )
    result = run_train(cfg)
    model, run = load_forecaster(tmp_path)
    assert run["model"] == "mlp"
    assert evaluate(model, data.splits["test"], data.scaler)["mse"] == pytest.approx(
        result.test["mse"], rel=1e-6
    )
