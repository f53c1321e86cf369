"""Training on a chosen device (``TrainConfig.device``), on a machine without a GPU: the CPU path
the GPU runs share, the clear errors, and the per-epoch record of where an epoch trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import build_run_config
from training.data import DataConfig, prepare
from training.engine import TrainConfig, fit
from training.loop import NON_SCHEDULE_FIELDS, resolve_device, schedule_of
from training.models import build_model
from training.train import run_train

QUICK = TrainConfig(epochs=2, batch_size=64, max_train_batches=4, progress=False, threads=1)


def test_auto_is_a_gpu_only_where_torch_sees_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_where_there_is_none_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=r"device: .* this torch sees no GPU \(use cpu or auto\)"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "gpu", "meta"])
def test_an_unknown_or_unsupported_device_names_the_field(name: str) -> None:
    with pytest.raises(ValueError, match=r"^device: "):
        resolve_device(name)


def test_the_device_is_not_part_of_the_schedule() -> None:
    """A run may resume on another device: its trained weights do not depend on the field."""
    assert "device" in NON_SCHEDULE_FIELDS
    a = schedule_of({"lr": 1e-3, "device": "cuda"})
    b = schedule_of({"lr": 1e-3, "device": "cpu"})
    assert a == b == {"lr": 1e-3}


def test_each_epoch_records_where_it_trained(tmp_path: Path) -> None:
    data = prepare(DataConfig("ETTh1", lookback=48, horizon=12))
    model = build_model("mlp", lookback=48, horizon=12, hidden=16)
    fit(model, data, QUICK, tmp_path, run_info={"model": "mlp"})
    history = json.loads((tmp_path / "run.json").read_text())["history"]
    assert [row["device"] for row in history] == ["cpu", "cpu"]
    assert json.loads((tmp_path / "run.json").read_text())["train"]["device"] == "cpu"


def test_a_run_asking_for_a_missing_gpu_fails_before_training(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = build_run_config(
        "mlp",
        None,
        {"dataset": "ETTh1", "lookback": 48, "horizon": 12},
        {"epochs": 1, "max_train_batches": 2, "progress": False, "device": "cuda"},
        out_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="sees no GPU"):
        run_train(run)
    assert not (tmp_path / "run" / "last.pt").exists()
