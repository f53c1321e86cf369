"""``python -m training crossval``: rolling-origin windows like neuralforecast's cross_validation
and the service's POST /v1/backtest, scored per series and overall, on a long file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training.test_models import TINY
from training.checkpoints import load_forecaster
from training.config import build_run_config
from training.crossval import CrossvalConfig, origins, run_crossval
from training.data import DataError, Scaler
from training.train import run_train

REPO = Path(__file__).resolve().parents[2]
L, H = 24, 8
LENGTHS = {"a": 200, "b": 160}


def long_csv(path: Path) -> Path:
    rows = []
    for k, (sid, n) in enumerate(LENGTHS.items()):
        t = np.arange(n)
        rows.append(
            pd.DataFrame(
                {
                    "unique_id": sid,
                    "ds": pd.date_range("2024-03-01", periods=n, freq="h"),
                    "load": (k + 1) * np.sin(2 * np.pi * t / 24) + 0.01 * t,
                    "temp": np.cos(2 * np.pi * t / 12) + k,
                }
            )
        )
    pd.concat(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("crossval")
    cfg = build_run_config(
        "mlp",
        data={"dataset": str(long_csv(tmp / "shops.csv")), "lookback": L, "horizon": H},
        train={"epochs": 1, "batch_size": 32, "max_train_batches": 3, "progress": False},
        model_settings=TINY["mlp"],
        out_dir=str(tmp / "run"),
    )
    return run_train(cfg).out_dir


def test_windows_cutoffs_and_scores_follow_the_rolling_origin_rule(run_dir: Path) -> None:
    h, n_windows, step = 6, 3, 4
    table, scores = run_crossval(CrossvalConfig(str(run_dir), h=h, n_windows=n_windows, step=step))
    assert list(table.columns) == ["unique_id", "ds", "cutoff", "channel", "y", "forecast"]
    assert len(table) == sum(n_windows * h * 2 for _ in LENGTHS)
    assert origins(160, h, n_windows, step) == [146, 150, 154]

    model, run = load_forecaster(run_dir)
    scaler = Scaler(
        np.asarray(run["dataset"]["scaler"]["mean"], np.float32),
        np.asarray(run["dataset"]["scaler"]["std"], np.float32),
    )
    raw = pd.read_csv(Path(run["data"]["dataset"]), parse_dates=["ds"])
    for sid, n in LENGTHS.items():
        mine = raw[raw.unique_id == sid].reset_index(drop=True)
        got = table[table.unique_id == sid]
        cutoffs = sorted(got.cutoff.unique())
        assert len(cutoffs) == n_windows
        # The last window ends at the series' last row; origins move by `step`.
        assert got.ds.max() == mine.ds.iloc[-1]
        for k, start in enumerate(origins(n, h, n_windows, step)):
            assert cutoffs[k] == mine.ds.iloc[start - 1]
            window = got[got.cutoff == cutoffs[k]]
            assert list(window.ds.unique()) == list(mine.ds.iloc[start : start + h])
            y = mine[["load", "temp"]].to_numpy(np.float32)
            x = torch.from_numpy(scaler.transform(y[start - L : start]))[None]
            with torch.no_grad():
                expected = scaler.inverse(model(x)[0, :h].numpy())
            got_f = window.pivot(index="ds", columns="channel", values="forecast")
            np.testing.assert_allclose(got_f[["load", "temp"]].to_numpy(), expected, atol=1e-5)
            got_y = window.pivot(index="ds", columns="channel", values="y")
            np.testing.assert_allclose(got_y[["load", "temp"]].to_numpy(), y[start : start + h])
        err = (got.forecast - got.y).to_numpy(np.float64)
        per = next(s for s in scores["series"] if s["unique_id"] == sid)
        assert per["points"] == n_windows * h * 2
        assert per["mse"] == pytest.approx(float((err**2).mean()), rel=1e-6)
        assert per["mae"] == pytest.approx(float(np.abs(err).mean()), rel=1e-6)
    err = (table.forecast - table.y).to_numpy(np.float64)
    assert scores["overall"]["mse"] == pytest.approx(float((err**2).mean()), rel=1e-6)
    assert scores["overall"]["points"] == len(table)


def test_too_short_a_history_says_how_many_rows_it_needs(run_dir: Path) -> None:
    # b has 160 rows: 20 windows of 8 every 8 after 24 need 24 + 8 + 8 * 19 = 184.
    with pytest.raises(DataError, match=r"series 'b' has 160 rows; .* need at least 184 rows"):
        run_crossval(CrossvalConfig(str(run_dir), n_windows=20))
    with pytest.raises(ValueError, match=r"h must be in \[1, 8\]"):
        run_crossval(CrossvalConfig(str(run_dir), h=9))


def test_cli_writes_windows_and_scores(run_dir: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "training", "crossval", "--run", str(run_dir)]
    argv += ["--n-windows", "2", "--out", str(tmp_path / "cv")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["h"] == H and result["step"] == H and result["series"] == 2
    table = pd.read_csv(result["windows_csv"])
    assert len(table) == 2 * 2 * H * 2
    scores = json.loads(Path(result["scores_json"]).read_text())
    assert scores["overall"]["mse"] == pytest.approx(result["mse"])
