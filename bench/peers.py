"""The peers a user could pick instead of the student: neuralforecast's DLinear and PatchTST.

Used by ``bench/students.py`` (stage ``peers``); needs the ``peers`` extra
(``pip install -c requirements.lock -e ".[peers]"``: neuralforecast 3.3.0).

Each peer is trained and scored on exactly the project's split (``training.data.prepare``):

* the rows ``[0, test_end)`` of the dataset (ETT hourly: 14400), z-scored with the scaler fit on
  the train slice (``PreparedData.scaler``), one neuralforecast series per channel (the peers are
  channel-independent, one set of weights shared by the channels, as in both papers);
* ``NeuralForecast.cross_validation(val_size=V, test_size=T, step_size=1, refit=False)`` with
  ``V``/``T`` the rows of our val/test slices: it trains on the train rows, validates on every
  validation window (the windows' inputs reach back into the train rows, as ours do), and
  forecasts every test window with stride 1. The forecasts are reshaped to ``[N, H, C]`` and the
  targets neuralforecast returns are checked to be our test windows' targets, value for value
  (so the window count and order are ours), then scored by ``training.engine.metrics``: MSE and
  MAE on the z-scored scale, over every window, step and channel.
* Early stopping on the validation MSE (checked once per epoch), and the weights of the best
  check are restored before forecasting (neuralforecast itself keeps the last weights; a
  callback here keeps the best in memory). An "epoch" is ``ceil(train windows / batch)`` steps:
  neuralforecast samples each step's windows at random rather than walking a permutation.

Hyperparameters (``PEERS``), from the papers' own scripts for ETT at L = 336:

* DLinear (Zeng et al., AAAI 2023; their ``scripts/EXP-LongForecasting/Linear``): moving
  average 25, shared weights across channels (``individual`` off), MSE loss, Adam lr 0.005
  (ETTh1) / 0.05 (ETTh2), batch 32 windows, lr halved every epoch, 10 epochs at most, patience 3.
* PatchTST/42's ETTh configuration (Nie et al., ICLR 2023; ``scripts/PatchTST/etth1.sh``):
  patches 16 / stride 8, 3 layers, d_model 16, 4 heads, d_ff 128, dropout 0.3 (fc 0.3, head 0),
  BatchNorm, residual attention, learned positions, RevIN without affine, MSE loss, Adam lr 1e-4,
  batch 128 windows, lr constant for 3 epochs then x0.9 per epoch ("type3"). The paper trains
  100 epochs on a GPU; here the cap is ``epochs`` (default 10, patience 3), what a 2-core CPU
  affords in about a quarter of an hour per cell. Records carry every budget.

A batch of ``b`` multivariate windows is ``b x C`` single-channel windows here
(``windows_batch_size``), the same values per optimiser step as the papers' loaders.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.data import PreparedData, load_frame
from training.engine import count_params, metrics
from training.loop import set_threads

log = logging.getLogger("bench.peers")


@dataclass(frozen=True)
class PeerSpec:
    """One peer's architecture and optimisation (see the module docstring for the sources)."""

    model: str  # neuralforecast class name
    settings: dict[str, Any]
    lr: dict[str, float]  # per dataset (lower-case); "default" otherwise
    batch: int  # multivariate windows per step
    epochs: int
    patience: int
    schedule: str  # "halve": x0.5 per epoch; "type3": constant 3 epochs, then x0.9 per epoch


PEERS: dict[str, PeerSpec] = {
    "nf-dlinear": PeerSpec(
        "DLinear",
        {"moving_avg_window": 25},
        {"etth1": 0.005, "etth2": 0.05, "default": 0.005},
        batch=32,
        epochs=10,
        patience=3,
        schedule="halve",
    ),
    "nf-patchtst": PeerSpec(
        "PatchTST",
        {
            "patch_len": 16,
            "stride": 8,
            "encoder_layers": 3,
            "hidden_size": 16,
            "n_heads": 4,
            "linear_hidden_size": 128,
            "dropout": 0.3,
            "fc_dropout": 0.3,
            "head_dropout": 0.0,
            "attn_dropout": 0.0,
            "batch_normalization": True,
            "res_attention": True,
            "learn_pos_embed": True,
            "revin": True,
            "revin_affine": False,
            "revin_subtract_last": False,
        },
        {"default": 1e-4},
        batch=128,
        epochs=10,
        patience=3,
        schedule="type3",
    ),
}


def schedule_factor(schedule: str, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate multiplier after ``step`` optimiser steps."""

    def halve(step: int) -> float:
        return 0.5 ** (step // steps_per_epoch)

    def type3(step: int) -> float:
        epoch = step // steps_per_epoch
        return 1.0 if epoch < 3 else 0.9 ** (epoch - 2)

    return {"halve": halve, "type3": type3}[schedule]


@dataclass
class PeerResult:
    pred: torch.Tensor  # [N, H, C] test forecasts, z-scored
    test: dict[str, float]
    val_mse: float  # at the restored (best) check
    params: int
    train_seconds: float
    epochs_run: float  # validation checks made (one per epoch)
    best_epoch: int
    finished: bool  # False: stopped by the time limit (the result is not a record)
    budget: dict[str, Any]


def peer_frame(data: PreparedData) -> tuple[Any, int, int]:
    """Long frame (``unique_id``, ``ds``, ``y``) of the z-scored rows ``[0, test_end)``; V, T."""
    import pandas as pd

    frame = load_frame(data.path, data.config.date_column or data.info.date_column)
    if frame.columns != data.columns:
        raise ValueError(f"{data.path}: columns {frame.columns} are not {data.columns}")
    train_end = data.borders["train"][1]
    val_end = data.borders["val"][1]
    test_end = data.borders["test"][1]
    scaled = data.scaler.transform(frame.values[:test_end])  # [T, C]
    rows, c = scaled.shape
    ds = pd.date_range("2000-01-01", periods=rows, freq="h")  # regular stamps; only order matters
    names = [f"c{k:03d}" for k in range(c)]  # sorted like the channels
    df = pd.DataFrame(
        {"unique_id": np.repeat(names, rows), "ds": np.tile(ds, c), "y": scaled.T.reshape(-1)}
    )
    return df, val_end - train_end, test_end - val_end


def run_peer(
    name: str,
    data: PreparedData,
    seed: int,
    threads: int,
    time_left: Callable[[], float | None] = lambda: None,
    epochs: int | None = None,
    smoke: bool = False,
) -> PeerResult:
    """Train peer ``name`` (a key of ``PEERS``) on ``data``'s train split and score every test
    window; ``time_left()`` (seconds, or None) stops training when it reaches 0."""
    import pytorch_lightning as pl
    from neuralforecast import NeuralForecast, models
    from neuralforecast.losses.pytorch import MSE

    for noisy in ("pytorch_lightning", "lightning", "lightning_fabric", "neuralforecast"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = PEERS[name]
    set_threads(threads)
    lookback, horizon, c = data.config.lookback, data.config.horizon, data.channels
    df, val_size, test_size = peer_frame(data)
    n_train = len(data.splits["train"])
    epochs = epochs or spec.epochs
    steps_per_epoch = math.ceil(n_train / spec.batch)
    if smoke:  # tests: two steps an "epoch", two epochs
        steps_per_epoch, epochs = 2, 2
    lr = spec.lr.get(data.info.name.lower(), spec.lr["default"])
    budget = {
        "epochs": epochs,
        "patience": spec.patience,
        "batch_size": spec.batch,
        "lr": lr,
        "lr_schedule": spec.schedule,
        "steps_per_epoch": steps_per_epoch,
        "max_steps": epochs * steps_per_epoch,
        "loss": "mse",
        **spec.settings,
    }

    class Watch(pl.Callback):
        """Best validation check's weights (restored at the end), clock, time limit."""

        def __init__(self) -> None:
            self.best = math.inf
            self.best_check = 0
            self.checks = 0
            self.state: dict[str, torch.Tensor] | None = None
            self.started = 0.0
            self.seconds = 0.0
            self.interrupted = False

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.started = time.perf_counter()

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if trainer.sanity_checking:
                return
            self.checks += 1
            value = float(trainer.callback_metrics["ptl/val_loss"])
            if value < self.best:
                self.best, self.best_check = value, self.checks
                self.state = copy.deepcopy(module.state_dict())

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            left = time_left()
            if left is not None and left <= 0:
                self.interrupted = True
                trainer.should_stop = True

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.seconds = time.perf_counter() - self.started
            if self.state is not None:
                module.load_state_dict(self.state)

    cls = getattr(models, spec.model)
    model = cls(
        h=horizon,
        input_size=lookback,
        loss=MSE(),
        max_steps=epochs * steps_per_epoch,
        learning_rate=lr,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR,
        lr_scheduler_kwargs={"lr_lambda": schedule_factor(spec.schedule, steps_per_epoch)},
        val_check_steps=steps_per_epoch,
        early_stop_patience_steps=spec.patience,
        batch_size=c,  # every channel's series in each step
        valid_batch_size=c,
        windows_batch_size=spec.batch * c,
        inference_windows_batch_size=1024,
        scaler_type="identity",  # the data are z-scored with the train split's scaler already
        random_seed=seed,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        callbacks=[Watch()],
        **spec.settings,
    )
    nf = NeuralForecast(models=[model], freq="h")
    out = nf.cross_validation(
        df=df, n_windows=None, val_size=val_size, test_size=test_size, step_size=1, refit=False
    )
    set_threads(threads)  # in case Lightning changed them
    # NeuralForecast trains deep copies of the models it is given: read the copy's callback.
    watch = next(cb for cb in nf.models[0].trainer_kwargs["callbacks"] if isinstance(cb, Watch))
    out = out.sort_values(["unique_id", "cutoff", "ds"])
    windows = data.splits["test"]
    n = len(windows)
    if len(out) != c * n * horizon:
        raise AssertionError(
            f"{name}: neuralforecast forecast {len(out) // (c * horizon)} test windows, we have {n}"
        )
    pred = torch.from_numpy(
        out[spec.model].to_numpy(np.float32).reshape(c, n, horizon).transpose(1, 2, 0).copy()
    )
    seen = torch.from_numpy(
        out["y"].to_numpy(np.float32).reshape(c, n, horizon).transpose(1, 2, 0).copy()
    )
    _, true = windows.batch(torch.arange(n))  # [N, H, C]
    if not torch.allclose(seen, true, atol=1e-5):
        raise AssertionError(f"{name}: neuralforecast's test targets are not our test windows")
    return PeerResult(
        pred=pred,
        test=metrics(pred, true, data.scaler),
        val_mse=watch.best,
        params=count_params(nf.models[0]),
        train_seconds=watch.seconds,
        epochs_run=watch.checks,
        best_epoch=watch.best_check,
        finished=not watch.interrupted,
        budget=budget,
    )
