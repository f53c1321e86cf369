"""``python -m training crossval``: the rolling-origin backtest of a run folder, offline.

The same windows and scores as the service's ``POST /v1/backtest`` (``service/core/backtest.py``)
and neuralforecast's ``cross_validation``: each series of ``n`` rows is cut into ``n_windows``
forecast windows of ``h`` steps whose origins move by ``step`` (default ``h``), the last window
ending at the series' last row. Window ``k`` (0 = oldest) forecasts rows ``[s_k, s_k + h)`` from
the ``lookback`` rows before ``s_k``, where ``s_k = n - h - step * (n_windows - 1 - k)``; its
``cutoff`` is the time of row ``s_k - 1`` (the last row the model saw). A series needs at least
``lookback + h + step * (n_windows - 1)`` rows.

The model is the run's best weights in torch, fed with the run's train scaler (``run.json``), on
the run's own file or on another one with the same columns (``dataset``): a wide file is one
series (its id is the file's stem), a long file's series are its ``unique_id`` values. Output: one
row per series, window, time step and channel (``unique_id``, ``ds``, ``cutoff``, ``channel``,
``y``, ``forecast``) and MSE/MAE over all points per series and overall, in raw units. Intervals
(and so coverage) come from the calibration written at export: backtest a registered model
through the service for those.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from training.checkpoints import load_forecaster
from training.data import (
    DataConfig,
    DataError,
    Scaler,
    load_frame,
    resolve_dataset,
    select_features,
)

log = logging.getLogger(__name__)

COLUMNS = ("unique_id", "ds", "cutoff", "channel", "y", "forecast")


@dataclass(frozen=True)
class CrossvalConfig:
    run: str
    h: int | None = None
    """Forecast steps per window (default: the model's horizon)."""
    n_windows: int = 1
    step: int | None = None
    """Rows between consecutive origins (default: ``h``)."""
    dataset: str | None = None
    """Another CSV with the run's columns (default: the run's own data)."""
    out: str | None = None
    """Folder for ``crossval.csv`` and ``crossval.json`` (default: ``<run>/crossval``)."""
    batch_size: int = 512


def needed_rows(lookback: int, h: int, n_windows: int, step: int) -> int:
    """The shortest history that holds ``n_windows`` windows of ``h`` steps ``step`` apart."""
    return lookback + h + step * (n_windows - 1)


def origins(n: int, h: int, n_windows: int, step: int) -> list[int]:
    """First forecast row of each window, oldest first."""
    return [n - h - step * (n_windows - 1 - k) for k in range(n_windows)]


def _scores(err: np.ndarray) -> dict[str, Any]:
    err = err.astype(np.float64)
    return {
        "mse": float((err * err).mean()),
        "mae": float(np.abs(err).mean()),
        "points": int(err.size),
    }


def run_crossval(cfg: CrossvalConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Backtest the run's model; return the per-window forecasts and the scores."""
    if cfg.n_windows < 1:
        raise ValueError(f"n_windows must be at least 1 (got {cfg.n_windows})")
    model, run = load_forecaster(Path(cfg.run))
    lookback, horizon = model.lookback, model.horizon
    h = cfg.h if cfg.h is not None else horizon
    if not 1 <= h <= horizon:
        raise ValueError(f"h must be in [1, {horizon}] (the model's horizon), got {h}")
    step = cfg.step if cfg.step is not None else h
    if step < 1:
        raise ValueError(f"step must be at least 1 (got {step})")
    if "data" not in run or "scaler" not in run.get("dataset", {}):
        raise ValueError(f"{cfg.run}/run.json records no data settings or train scaler")
    data_cfg = DataConfig(**run["data"])
    if cfg.dataset is not None:
        data_cfg = replace(data_cfg, dataset=cfg.dataset)
    info, path = resolve_dataset(data_cfg.dataset, data_cfg.data_dir)
    frame = load_frame(path, data_cfg.date_column or info.date_column, data_cfg.id_column)
    values, columns = select_features(frame, data_cfg, info)
    trained_on = tuple(run["dataset"].get("columns", columns))
    if columns != trained_on:
        raise DataError(
            f"{path}: columns {list(columns)}; the run was trained on {list(trained_on)}"
        )
    scaler = Scaler(
        np.asarray(run["dataset"]["scaler"]["mean"], dtype=np.float32),
        np.asarray(run["dataset"]["scaler"]["std"], dtype=np.float32),
    )
    series = frame.series or {info.name: (0, len(values))}
    need = needed_rows(lookback, h, cfg.n_windows, step)
    for sid, (a, b) in series.items():
        if b - a < need:
            raise DataError(
                f"{path}: series {sid!r} has {b - a} rows; {cfg.n_windows} windows of h={h} every "
                f"{step} steps after a lookback of {lookback} need at least {need} rows"
            )

    scaled = scaler.transform(values)
    inputs, targets, rows = [], [], []
    for sid, (a, b) in series.items():
        for s in origins(b - a, h, cfg.n_windows, step):
            first = a + s
            inputs.append(scaled[first - lookback : first])
            targets.append(values[first : first + h])
            rows.append((sid, first))
    x = torch.from_numpy(np.stack(inputs))  # [W, L, C]
    preds = []
    with torch.no_grad():
        for chunk in x.split(cfg.batch_size):
            preds.append(model(chunk)[:, :h])  # [B, h, C]
    yhat = np.asarray(scaler.inverse(torch.cat(preds).numpy()), dtype=np.float32)  # [W, h, C]
    y = np.stack(targets)  # [W, h, C]

    c = len(columns)
    ids = np.repeat(np.array([sid for sid, _ in rows], dtype=object), h * c)
    firsts = np.array([first for _, first in rows])
    ds = frame.dates[firsts[:, None] + np.arange(h)[None, :]]  # [W, h]
    cutoff = np.broadcast_to(frame.dates[firsts - 1][:, None], (len(rows), h))
    table = pd.DataFrame(
        {
            "unique_id": ids,
            "ds": np.repeat(ds.reshape(-1), c),
            "cutoff": np.repeat(cutoff.reshape(-1), c),
            "channel": np.tile(np.array(columns, dtype=object), len(rows) * h),
            "y": y.reshape(-1),
            "forecast": yhat.reshape(-1),
        }
    )
    err = yhat.astype(np.float64) - y.astype(np.float64)  # [W, h, C]
    window_series = np.array([sid for sid, _ in rows], dtype=object)
    scores = {
        "run": str(cfg.run),
        "model": run["model"],
        "file": str(path),
        "lookback": lookback,
        "h": h,
        "n_windows": cfg.n_windows,
        "step": step,
        "overall": _scores(err),
        "series": [{"unique_id": sid, **_scores(err[window_series == sid])} for sid in series],
    }
    return table, scores


def write_crossval(cfg: CrossvalConfig) -> dict[str, Any]:
    """Run the backtest and write ``crossval.csv`` and ``crossval.json``; return a summary."""
    table, scores = run_crossval(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "crossval"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "crossval.csv", index=False)
    (out / "crossval.json").write_text(json.dumps(scores, indent=2) + "\n")
    log.info(
        "%d series x %d windows: MSE %.4g, MAE %.4g -> %s",
        len(scores["series"]),
        cfg.n_windows,
        scores["overall"]["mse"],
        scores["overall"]["mae"],
        out,
    )
    return {
        **{k: scores[k] for k in ("model", "lookback", "h", "n_windows", "step")},
        "series": len(scores["series"]),
        **scores["overall"],
        "windows_csv": str(out / "crossval.csv"),
        "scores_json": str(out / "crossval.json"),
    }
