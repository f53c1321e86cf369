"""What a checked export is: forecasts on the splits, metrics, calibration, the manifest.

``export_model`` / ``export_run`` turn a trained model (or a run folder) into an
:class:`ExportedModel`: ONNX bytes that passed the parity check (``training.export``), the
validation-split forecasts, split-conformal calibration from them, metrics and a manifest.
Nothing is registered here (``training.publish`` does that).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from models_registry.manifest import DatasetInfo as ManifestDataset
from models_registry.manifest import Lineage, Manifest, ModelRef
from training.checkpoints import load_forecaster
from training.data import DataConfig, PreparedData, infer_step, prepare
from training.engine import metrics as split_metrics
from training.export import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    PARITY_WINDOWS,
    WINDOW_STD_EPS,
    ExportError,
    ParityReport,
    ServingGraph,
    check_parity,
    equivariance_error,
    export_onnx,
    raw_windows,
    serving_graph,
)
from training.models import MODELS
from training.models.base import Forecaster

log = logging.getLogger(__name__)

CALIBRATION_LEVELS = tuple(range(50, 100))
REPO_ROOT = Path(__file__).resolve().parent.parent

ForecastFn = Callable[[Tensor], Tensor]
"""Raw windows ``[B, L, C]`` -> raw forecasts ``[B, H, C]``."""


@dataclass(frozen=True)
class SplitForecast:
    """A forecaster's raw forecasts on every window of a split, with what scoring them needs."""

    split: str
    yhat: Tensor  # [N, H, C] raw
    y: Tensor  # [N, H, C] raw
    scale: Tensor  # [N, 1, C] float64: sqrt(var(input window) + 1e-5), raw units

    def averaged(self, others: Sequence[SplitForecast]) -> SplitForecast:
        """The mean forecast of this and ``others`` (same split and windows)."""
        yhat = torch.stack([self.yhat, *(o.yhat for o in others)]).mean(dim=0)
        return SplitForecast(self.split, yhat, self.y, self.scale)


@torch.no_grad()
def forecast_split(
    forecast: ForecastFn, data: PreparedData, split: str, batch_size: int = 512
) -> SplitForecast:
    """Run a raw forecaster over every window of a split, in order."""
    windows = data.splits[split]
    preds, trues, scales = [], [], []
    for index in windows.batches(batch_size):
        x, y = windows.batch(index)
        x_raw = data.scaler.inverse(x)
        # (mypy ignore on the next line) forecast is one of two callables with different
        # tensor/array signatures, chosen above
        preds.append(forecast(x_raw))  # type: ignore[arg-type]
        trues.append(data.scaler.inverse(y))
        # (mypy ignore on the next line) x_raw is a Tensor on this path (numpy inputs were converted
        # above)
        var = x_raw.double().var(dim=1, unbiased=False, keepdim=True)  # type: ignore[union-attr]
        scales.append(torch.sqrt(var + WINDOW_STD_EPS))  # [B, 1, C]
    # (mypy ignore on the next line) the lists hold Tensors on this path (see above)
    return SplitForecast(split, torch.cat(preds), torch.cat(trues), torch.cat(scales))  # type: ignore[arg-type]


def conformal_quantiles(scores: np.ndarray, levels: Sequence[int]) -> list[list[float]]:
    """``scores [n, H]`` -> per level, the ceil((n + 1) * level / 100)-th smallest score per step.

    The finite-sample correction of split conformal prediction: with n exchangeable scores, the
    interval covers a new one with probability >= level / 100. ``k > n`` would need an infinite
    bound; it cannot happen for levels < 100 once n >= 100, and is clamped to the maximum.
    """
    n = scores.shape[0]
    ordered = np.sort(scores, axis=0)  # [n, H]
    rows = []
    for level in levels:
        k = math.ceil((n + 1) * level / 100)
        if k > n:
            log.warning("calibration: %d scores are too few for level %d; using the max", n, level)
        rows.append(ordered[min(k, n) - 1].astype(float).tolist())
    return rows


def calibration_from(
    fc: SplitForecast, levels: Sequence[int] = CALIBRATION_LEVELS
) -> dict[str, Any]:
    """Split-conformal calibration (docs/contracts.md) from a forecaster's run over a split.

    score = |y - yhat| / s for every window, channel and step, s = sqrt(var(window) + 1e-5) of
    the channel's raw input window; the quantiles per step pool windows and channels.
    """
    score = ((fc.y.double() - fc.yhat.double()).abs() / fc.scale).transpose(1, 2)  # [N, C, H]
    table = score.reshape(-1, score.shape[-1]).numpy()  # [N * C, H]
    return {
        "method": "split-conformal",
        "score": "abs_residual_over_window_std",
        "split": fc.split,
        "n": int(table.shape[0]),
        "levels": list(levels),
        "quantiles": conformal_quantiles(table, levels),
    }


def metrics_from(fc: SplitForecast, data: PreparedData) -> dict[str, float]:
    """MSE/MAE on the z-scored and the raw scale (``training.engine.metrics``)."""
    mean = torch.from_numpy(data.scaler.mean)
    std = torch.from_numpy(data.scaler.std)
    return split_metrics((fc.yhat - mean) / std, (fc.y - mean) / std, data.scaler)


def _flat_metrics(val: dict[str, Any], test: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for split, values in (("val", val), ("test", test)):
        for key in ("mse", "mae", "mse_raw", "mae_raw"):
            if key in values:
                out[f"{split}_{key}"] = float(values[key])
    return out


@lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the repository (``-dirty`` when changed), else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        if out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"distilcast=={version('distilcast')}"
    except Exception:  # metadata missing or broken: not worth failing an export for
        return "unknown"


MODEL_PATHS = ("training", "models_registry", "data", "pyproject.toml", "requirements.lock")
"""What shapes a model: uncommitted changes here make a lineage's commit insufficient."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD's full sha, whether ``MODEL_PATHS`` have uncommitted changes), or (None, None)
    outside a git checkout (an installed package)."""
    head = _git("rev-parse", "HEAD")
    if head is None or not head.strip():
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *MODEL_PATHS)
    return head.strip(), None if status is None else bool(status.strip())


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file (cached per path, size and modification time)."""
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _display_path(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else resolved)


def build_lineage(
    data: PreparedData,
    run_dir: str | os.PathLike[str] | None = None,
    run: dict[str, Any] | None = None,
) -> Lineage:
    """The lineage of a model trained on ``data``: git state now, the data file and its sha256,
    and, from a run folder's ``run.json``, the seed, optimisation and distillation settings."""
    commit, dirty = git_state()
    train = dict((run or {}).get("train") or {})
    distill = (run or {}).get("distill")
    return Lineage(
        git_commit=commit,
        git_dirty=dirty,
        seed=train.get("seed"),
        data_file=data.path.name,
        data_sha256=file_sha256(data.path),
        run_dir=_display_path(Path(run_dir)) if run_dir is not None else None,
        train=train,
        distill=dict(distill) if isinstance(distill, dict) else {},
    )


def frequency(data: PreparedData) -> str | None:
    """The catalogue's frequency, else the median timestamp step as a pandas offset alias."""
    if data.info.freq:
        return data.info.freq
    if data.dates is None:
        return None
    seconds = infer_step(data.dates)
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return str(pd.tseries.frequencies.to_offset(pd.Timedelta(seconds=seconds)).freqstr)


def dataset_info(data: PreparedData) -> ManifestDataset:
    cfg = data.config
    target = data.columns[0] if cfg.features == "S" else None
    return ManifestDataset(
        name=data.info.name,
        file=data.path.name,
        split_borders={k: (int(a), int(b)) for k, (a, b) in data.borders.items()},
        features=list(data.columns),
        target=target,
    )


def build_manifest(
    *,
    name: str,
    kind: str,
    architecture: str,
    config: dict[str, Any],
    graph: ServingGraph,
    data: PreparedData,
    metrics: dict[str, float],
    calibration: dict[str, Any] | None,
    parity: ParityReport,
    teachers: Sequence[ModelRef | str] = (),
    opset: int = OPSET,
    lineage: Lineage | None = None,
) -> Manifest:
    """An unregistered manifest (version, sha256 and created_at are set by the store).

    ``lineage`` defaults to what ``data`` and the checkout tell (no seed or run folder)."""
    channels = graph.manifest_channels
    ch: int | str = channels if channels is not None else "channels"
    return Manifest(
        name=name,
        version=0,  # unregistered: the store numbers it
        sha256=None,  # the store hashes the bytes it is given
        # (mypy ignore on the next line) kind is validated against the registry's literal kinds by
        # Manifest itself
        kind=kind,  # type: ignore[arg-type]
        architecture=architecture,
        config=config,
        lookback=graph.lookback,
        horizon=graph.horizon,
        channels=channels,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_shape=["batch", graph.lookback, ch],
        output_shape=["batch", graph.horizon, ch],
        normalisation=graph.normalisation,
        dataset=dataset_info(data),
        frequency=frequency(data),
        metrics=metrics,
        # (mypy ignore on the next line) calibration's dict matches the manifest's typed mapping;
        # validated on load
        calibration=calibration,  # type: ignore[arg-type]
        teachers=[ModelRef.parse(t) if isinstance(t, str) else t for t in teachers],
        parity_max_abs_err=parity.max_abs_err,
        opset=opset,
        created_at=datetime.now(UTC),
        code_version=code_version(),
        lineage=lineage if lineage is not None else build_lineage(data),
    )


@dataclass
class ExportedModel:
    """A checked export, ready to register."""

    manifest: Manifest
    onnx_bytes: bytes
    parity: ParityReport
    graph: ServingGraph
    val: SplitForecast
    """Its forecasts on the validation split (calibration; reused for an ensemble's)."""


def data_for_run(run: dict[str, Any]) -> PreparedData:
    """Re-prepare the data a run was trained on, from its ``run.json``."""
    if "data" not in run:
        raise ExportError("run.json records no 'data' settings; pass the prepared data")
    return prepare(DataConfig(**run["data"]))


def _check_data(model: Forecaster, data: PreparedData, where: str) -> None:
    lookback, horizon = data.config.lookback, data.config.horizon
    if (model.lookback, model.horizon) != (lookback, horizon):
        raise ExportError(
            f"{where}: model has lookback/horizon {model.lookback}/{model.horizon}, "
            f"the data {lookback}/{horizon}"
        )


def export_model(
    model: Forecaster,
    data: PreparedData,
    *,
    name: str,
    architecture: str,
    kind: str | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    teachers: Sequence[ModelRef | str] = (),
    path: str | os.PathLike[str] | None = None,
    parity_windows: int | None = PARITY_WINDOWS,
    tolerance: float | None = None,
    lineage: Lineage | None = None,
) -> ExportedModel:
    """Export, parity-check and describe one trained model (nothing is registered)."""
    _check_data(model, data, name)
    model.eval()
    graph = serving_graph(model, data)
    x_raw = raw_windows(data, "test", parity_windows)
    onnx_bytes = export_onnx(
        graph.module,
        graph.lookback,
        graph.channels,
        path,
        dynamic_channels=graph.dynamic_channels,
        example=x_raw[:2],
    )
    parity = check_parity(
        onnx_bytes,
        graph.module,
        x_raw,
        data.scaler.std,
        dynamic_channels=graph.dynamic_channels,
        instance_scaled=bool(graph.normalisation["scale_equivariant"]),
        tolerance=tolerance,
        what=name,
    )
    graph.normalisation["raw_vs_scaled_max_abs_err"] = equivariance_error(model, graph, data, x_raw)
    if graph.normalisation["raw_vs_scaled_max_abs_err"] > 1e-3:
        log.warning(
            "%s: serving raw values differs from the z-scored forecast by up to %.2g "
            "(std units); the metrics were measured on z-scored inputs",
            name,
            graph.normalisation["raw_vs_scaled_max_abs_err"],
        )
    val = forecast_split(graph.module, data, "val")
    if metrics is None:
        test = forecast_split(graph.module, data, "test")
        metrics = _flat_metrics(metrics_from(val, data), metrics_from(test, data))
    calibration = calibration_from(val)
    if kind is None:
        kind = MODELS[architecture].kind if architecture in MODELS else "student"
    manifest = build_manifest(
        name=name,
        kind=kind,
        architecture=architecture,
        config=config if config is not None else asdict(model.cfg),
        graph=graph,
        data=data,
        metrics=metrics,
        calibration=calibration,
        parity=parity,
        teachers=teachers,
        lineage=lineage,
    )
    return ExportedModel(manifest, onnx_bytes, parity, graph, val)


def export_run(
    run_dir: str | os.PathLike[str],
    name: str,
    *,
    data: PreparedData | None = None,
    teachers: Sequence[ModelRef | str] = (),
    kind: str | None = None,
    path: str | os.PathLike[str] | None = None,
    parity_windows: int | None = PARITY_WINDOWS,
    tolerance: float | None = None,
) -> ExportedModel:
    """Load a run folder's best weights and export them (see ``export_model``)."""
    run_dir = Path(run_dir)
    model, run = load_forecaster(run_dir)
    if data is None:
        data = data_for_run(run)
    metrics = _flat_metrics(run["val"], run["test"]) if "val" in run and "test" in run else None
    return export_model(
        model,
        data,
        name=name,
        architecture=run["model"],
        kind=kind or run.get("kind"),
        config=run["model_config"],
        metrics=metrics,
        teachers=teachers,
        path=path,
        parity_windows=parity_windows,
        tolerance=tolerance,
        lineage=build_lineage(data, run_dir, run),
    )


def ensemble_fields(
    modules: Sequence[nn.Module],
    data: PreparedData,
    val_forecasts: Sequence[SplitForecast] | None = None,
) -> dict[str, Any]:
    """Metrics and calibration of the members' mean forecast, for the group's manifest.

    ``val_forecasts`` (``ExportedModel.val`` of each member) saves a pass over the val split.
    """
    if not modules:
        raise ExportError("an ensemble needs at least one member")
    vals = list(val_forecasts or [forecast_split(m, data, "val") for m in modules])
    tests = [forecast_split(m, data, "test") for m in modules]
    val, test = vals[0].averaged(vals[1:]), tests[0].averaged(tests[1:])
    return {
        "metrics": _flat_metrics(metrics_from(val, data), metrics_from(test, data)),
        "calibration": calibration_from(val),
        "dataset": dataset_info(data),
        "frequency": frequency(data),
    }
