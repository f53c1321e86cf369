"""``--workers``: the train run under Ray Train (2 local CPU workers, DDP over gloo)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.strict import require_module
from training.checkpoints import load_forecaster
from training.config import RunConfig, build_run_config
from training.data import WindowSet, prepare
from training.distributed import DistributedConfig, ShardedWindows, run_distributed
from training.engine import evaluate
from training.models import build_model

L, H = 48, 12


def test_shards_are_disjoint_equal_and_cover_every_window() -> None:
    windows = WindowSet(np.zeros((107, 2), dtype=np.float32), 24, 6, 0)  # 78 windows
    shards = [ShardedWindows(windows, rank, 3) for rank in range(3)]
    batches = [
        s.batches(16, shuffle=True, generator=torch.Generator().manual_seed(5)) for s in shards
    ]
    # Same number and sizes of batches everywhere (DDP steps together), ceil(16 / 3) windows each.
    assert len({tuple(len(b) for b in per) for per in batches}) == 1
    assert max(len(b) for b in batches[0]) == 6
    taken = [torch.cat(per) for per in batches]
    assert sorted(torch.cat(taken).tolist()) == list(range(78))  # 78 = 3 x 26: no padding
    single = windows.batches(16, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat(single)[0::3], taken[0])  # the single-process order, strided
    with pytest.raises(ValueError, match="rank 3"):
        ShardedWindows(windows, 3, 3)


def test_shards_pad_by_wrapping_when_uneven() -> None:
    windows = WindowSet(np.zeros((40, 1), dtype=np.float32), 8, 2, 0)  # 31 windows
    taken = [torch.cat(ShardedWindows(windows, r, 2).batches(8)) for r in range(2)]
    assert len(taken[0]) == len(taken[1]) == 16
    assert set(torch.cat(taken).tolist()) == set(range(31))


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = require_module("ray")  # the batch extra (CI installs it) brings ray[train]
    require_module("ray.train.torch")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """A straight 2-worker run of 2 epochs in ``runs/run``."""
    root = tmp_path_factory.mktemp("distributed")
    rng = np.random.default_rng(0)
    t = np.arange(400)
    cols = {
        f"c{i}": np.sin(2 * np.pi * t / (12 + 5 * i)) + 0.1 * rng.normal(size=len(t))
        for i in range(3)
    }
    pd.DataFrame({"date": pd.date_range("2024-01-01", periods=len(t), freq="h"), **cols}).to_csv(
        root / "series.csv", index=False
    )
    run_distributed(config(root, "run"), workers=2)
    return root


def config(root: Path, out: str, **train: int) -> RunConfig:
    return build_run_config(
        "patchtst",
        data={"dataset": str(root / "series.csv"), "lookback": L, "horizon": H},
        train={"epochs": 2, "batch_size": 16, "lr": 0.003, "progress": False, "threads": 1} | train,
        model_settings={"d_model": 8, "n_heads": 2, "d_ff": 16, "n_layers": 1},
        out_dir=str(root / out),
    )


def test_two_workers_train_and_the_checkpoint_loads_in_one_process(runs: Path) -> None:
    out = runs / "run"
    doc = json.loads((out / "run.json").read_text())
    assert doc["workers"] == 2 and doc["finished"]
    losses = [row["train_loss"] for row in doc["history"]]
    vals = [row["val_mse"] for row in doc["history"]]
    assert len(losses) == 2 and losses[1] < losses[0] and vals[1] < vals[0]
    # Ray's checkpoints were written, and the run folder holds the newest one.
    assert sorted((out / "ray" / "run").glob("checkpoint_*"))

    # The checkpoint loads into the single-process model and scores what the run recorded.
    model, run = load_forecaster(out)
    data = prepare(config(runs, "run").data)
    assert evaluate(model, data.splits["val"], data.scaler)["mse"] == pytest.approx(
        doc["val"]["mse"], rel=1e-5
    )
    last = torch.load(out / "last.pt", weights_only=True)
    plain: nn.Module = build_model("patchtst", **run["model_config"])
    plain.load_state_dict(last["module"])  # strict: no DDP "module." prefixes
    assert last["epoch"] == 2


def test_a_stopped_run_resumes_from_rays_checkpoint_exactly(runs: Path) -> None:
    stopped = run_distributed(config(runs, "stopped", stop_after_epochs=1), workers=2)
    assert not stopped.finished and stopped.epochs_run == 1
    resumed = run_distributed(config(runs, "stopped"), workers=2, resume=True)
    assert resumed.finished and [row["epoch"] for row in resumed.history] == [1, 2]
    straight = torch.load(runs / "run" / "last.pt", weights_only=True)["module"]
    again = torch.load(runs / "stopped" / "last.pt", weights_only=True)["module"]
    assert set(again) == set(straight)
    assert all(torch.equal(again[k], straight[k]) for k in again)


def test_bad_settings_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="workers"):
        DistributedConfig(workers=0)
    with pytest.raises(ValueError, match="cpus_per_worker"):
        DistributedConfig(cpus_per_worker=0)
    with pytest.raises(ValueError, match="max_failures"):
        DistributedConfig(max_failures=-2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "2", "--cpus-per-worker", "0"], "cpus_per_worker must be >= 1"),
        (["--storage", "/tmp/x", "--max-failures", "-2"], "max_failures must be >= -1"),
    ],
)
def test_the_cli_hands_its_worker_flags_to_ray_train_and_names_a_bad_one(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Any worker flag (not only --workers) routes `train` to run_distributed, which refuses
    a bad setting by name before starting Ray."""
    from training.cli import main

    argv = ["train", "--model", "mlp", "--dataset", "ETTh1", "--out", str(tmp_path / "r")]
    assert main([*argv, "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err
