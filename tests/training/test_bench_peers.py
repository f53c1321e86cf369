"""bench/peers.py: neuralforecast's DLinear and PatchTST on exactly our split (toy budgets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import peers
from training.config import build_run_config
from training.data import PreparedData, prepare
from training.engine import metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data() -> PreparedData:
    cfg = build_run_config(
        "mlp", None, {"dataset": "ETTh1", "data_dir": str(REPO / "data"), "horizon": 24}
    )
    return prepare(cfg.data)


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_a_peer_forecasts_every_test_window_of_our_split_and_is_scored_by_our_metrics(
    name: str, data: PreparedData
) -> None:
    res = peers.run_peer(name, data, seed=0, threads=1, smoke=True)
    n = len(data.splits["test"])
    assert res.pred.shape == (n, 24, data.channels)  # every window, no dropped last batch
    _, true = data.splits["test"].batch(torch.arange(n))
    assert res.test == metrics(res.pred, true, data.scaler)
    assert res.finished and res.best_epoch >= 1 and res.val_mse > 0
    spec = peers.PEERS[name]
    assert res.budget["lr"] == spec.lr.get("etth1", spec.lr["default"])
    if name == "nf-dlinear":  # one Linear(L->H) per component, shared by every channel
        assert res.params == 2 * (336 * 24 + 24)


def test_a_time_limit_stops_a_peer_without_a_result() -> None:
    cfg = build_run_config(
        "mlp", None, {"dataset": "ETTh1", "data_dir": str(REPO / "data"), "horizon": 24}
    )
    res = peers.run_peer("nf-dlinear", prepare(cfg.data), 0, 1, time_left=lambda: 0.0, smoke=True)
    assert not res.finished
