"""Export trained forecasters to ONNX, check them against torch, and register them with a manifest.

The graph contract (docs/contracts.md): input ``x: float32[batch, L, channels]`` and output
``y: float32[batch, H, channels]``, both in RAW units, so the service never needs the training
scaler. Scale-equivariant models (RevIN inside) are exported as they are, with a symbolic
``channels`` axis when they are channel-independent; any other model is wrapped as
``(x - mu) / sd -> model -> * sd + mu`` with the train scaler, which pins the channel count.

Exporter: ``torch.onnx.export(..., dynamo=True)`` at opset 18. The TorchScript exporter
(``dynamo=False``) is deprecated since torch 2.9 (it warns on every call), cannot export
PatchTST's ``unfold`` once the batch and channel axes are symbolic, and names the fixed horizon
axis symbolically; the dynamo exporter handles both models with the exact axes of the contract.
Opset 18 is the dynamo exporter's native opset (asking for 17 goes through a version converter
that fails on these graphs and silently leaves 18), and onnxruntime >= 1.14 runs it.

Every export is checked: onnxruntime and torch forecast the same real test windows in raw units
(the full batch, a batch of one, and for channel-independent graphs one channel and twice the
channels); the largest difference divided by each channel's train std must be <= 1e-4 or the
model is refused (``ParityError``). The figure goes into the manifest as ``parity_max_abs_err``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import math
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch
from torch import Tensor, nn

from models_registry.errors import RegistryError
from models_registry.manifest import AliasEvent, Manifest, ModelRef
from models_registry.manifest import DatasetInfo as ManifestDataset
from models_registry.registry import open_registry
from models_registry.store import FilesystemStore
from training.checkpoints import load_forecaster
from training.data import DataConfig, PreparedData, infer_step, prepare
from training.engine import metrics as split_metrics
from training.models import MODELS

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "x", "y"
PARITY_TOLERANCE = 1e-4
"""Max |onnx - torch| / train std of the channel (the z-scored scale) a graph may show."""
PARITY_WINDOWS = 512
CALIBRATION_LEVELS = tuple(range(50, 100))
WINDOW_STD_EPS = 1e-5
"""The contract's window scale s = sqrt(var + 1e-5): RevIN's statistic, and the service's."""
REGISTRY_ENV, REDIS_ENV = "DISTILCAST_REGISTRY_ROOT", "DISTILCAST_REDIS_URL"
DEFAULT_REGISTRY = "./var/registry"
REPO_ROOT = Path(__file__).resolve().parent.parent

ForecastFn = Callable[[Tensor], Tensor]
"""Raw windows ``[B, L, C]`` -> raw forecasts ``[B, H, C]``."""


class ExportError(ValueError):
    """A model that cannot be exported or registered as asked (the message says why)."""


class ParityError(ExportError):
    """The ONNX graph does not forecast what the torch model forecasts: it is not registered."""

    def __init__(self, what: str, max_abs_err: float, tolerance: float, checks: dict[str, float]):
        self.max_abs_err = max_abs_err
        self.tolerance = tolerance
        self.checks = checks
        detail = ", ".join(f"{k}: {v:.3g}" for k, v in checks.items())
        super().__init__(
            f"{what}: ONNX parity check failed: max |onnx - torch| / train std = "
            f"{max_abs_err:.3g} > {tolerance:g} ({detail}); refusing to register it"
        )


def registry_root(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$DISTILCAST_REGISTRY_ROOT``, else ``./var/registry``."""
    return Path(path or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


# -- the served graph --------------------------------------------------------------------------


class RawScaleForecaster(nn.Module):
    """``(x - mu) / sd -> model -> * sd + mu``: a model trained on z-scores served on raw values.

    Needed for models that are not scale-equivariant (e.g. ``mlp`` with ``norm="mean"``); the
    per-channel train statistics fix the channel count of the graph.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, 1, -1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, 1, -1))

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, L, C] raw
        z = (x - self.mean) / self.std  # [B, L, C]
        return self.model(z) * self.std + self.mean  # [B, H, C]


@dataclass(frozen=True)
class ServingGraph:
    """The module exported (raw in, raw out) and what the manifest says about it."""

    module: nn.Module
    lookback: int
    horizon: int
    channels: int
    dynamic_channels: bool
    normalisation: dict[str, Any]

    @property
    def manifest_channels(self) -> int | None:
        return None if self.dynamic_channels else self.channels


def serving_graph(model: nn.Module, data: PreparedData) -> ServingGraph:
    """Wrap ``model`` so that it maps raw windows to raw forecasts (see the module docstring)."""
    model.eval()
    scaler = {"mean": data.scaler.mean.tolist(), "std": data.scaler.std.tolist()}
    equivariant = bool(getattr(model, "scale_equivariant", False))
    independent = bool(getattr(model, "channel_independent", False))
    lookback, horizon = int(model.lookback), int(model.horizon)  # type: ignore[arg-type]
    norm = getattr(getattr(model, "cfg", None), "norm", None)
    if equivariant:
        normalisation = {
            "input": "raw",
            "output": "raw",
            "method": "instance",  # per window and channel (RevIN) inside the model
            "scale_equivariant": True,
            "train_scaler": scaler,
        }
        module: nn.Module = model
        dynamic = independent
    else:
        normalisation = {
            "input": "raw",
            "output": "raw",
            "method": "train_scaler",  # (x - mean) / std in the graph, * std + mean after
            "scale_equivariant": False,
            "train_scaler": scaler,
        }
        module = RawScaleForecaster(model, data.scaler.mean, data.scaler.std).eval()
        dynamic = False
    if norm is not None:
        normalisation["model_norm"] = norm
    return ServingGraph(module, lookback, horizon, data.channels, dynamic, normalisation)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints progress to stdout and warns about unrelated things."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()) as captured,
        ):
            warnings.simplefilter("ignore")
            yield
        if captured.getvalue().strip():
            log.debug("exporter output:\n%s", captured.getvalue())
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    lookback: int,
    channels: int,
    path: str | os.PathLike[str] | None = None,
    *,
    dynamic_channels: bool | None = None,
    opset: int = OPSET,
    example: Tensor | None = None,
) -> bytes:
    """Export ``model`` (raw ``x[B, L, C]`` -> ``y[B, H, C]``) to ONNX bytes (and ``path``).

    The batch axis is always symbolic (``batch``); the channel axis is symbolic (``channels``)
    when ``dynamic_channels`` (default: the model's ``channel_independent`` flag), else fixed at
    ``channels``. ``example`` is the tracing input (real windows are best; any values work).
    """
    if dynamic_channels is None:
        dynamic_channels = bool(getattr(model, "channel_independent", False))
    model.eval()
    # A model may offer an equivalent graph that serves faster (the MLP folds its linear layers);
    # callers check parity against ``model`` itself.
    fold = getattr(model, "inference_module", None)
    if callable(fold):
        model = fold()
        model.eval()
    if example is None:
        example = torch.randn(2, lookback, channels)
    # torch.export specialises axes of size 0 or 1, so trace with at least 2 rows and channels.
    if example.shape[0] < 2:
        example = example.expand(2, -1, -1)
    if dynamic_channels and example.shape[2] < 2:
        example = example.repeat(1, 1, 2)
    if not dynamic_channels and example.shape[2] != channels:
        raise ExportError(f"example has {example.shape[2]} channels, the graph fixes {channels}")
    example = example.detach().to(torch.float32).contiguous()
    dims: dict[int, Any] = {0: torch.export.Dim("batch")}
    if dynamic_channels:
        dims[2] = torch.export.Dim("channels")
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({**dims},),
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types; keep the cause
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    assert program is not None
    proto = program.model_proto
    _check_graph(proto, lookback, channels, dynamic_channels, opset)
    data = proto.SerializeToString()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return data


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param if d.dim_param else int(d.dim_value)
        for d in value_info.type.tensor_type.shape.dim
    ]


def _check_graph(
    proto: onnx.ModelProto, lookback: int, channels: int, dynamic: bool, opset: int
) -> None:
    """The exported signature is the contract's, or the export is refused."""
    onnx.checker.check_model(proto)
    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        raise ExportError(
            f"exported graph has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in outputs]}, expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    ch: int | str = "channels" if dynamic else channels
    got = _dims(inputs[0])
    if got != ["batch", lookback, ch]:
        raise ExportError(f"exported input shape {got}, expected ['batch', {lookback}, {ch!r}]")
    out = _dims(outputs[0])
    if len(out) != 3 or out[0] != "batch" or out[2] != ch or not isinstance(out[1], int):
        raise ExportError(f"exported output shape {out}, expected ['batch', H, {ch!r}]")
    versions = {o.domain: o.version for o in proto.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ExportError(f"exported graph has opset {versions}, expected {opset}")


def onnx_session(onnx_bytes: bytes, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


# -- parity --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityReport:
    max_abs_err: float
    """Largest |onnx - torch| / train std of the channel over every check."""
    tolerance: float
    windows: int
    checks: dict[str, float] = field(default_factory=dict)


def raw_windows(data: PreparedData, split: str = "test", n: int | None = PARITY_WINDOWS) -> Tensor:
    """Up to ``n`` evenly spaced windows of a split, in raw units: ``[N, L, C]``."""
    windows = data.splits[split]
    total = len(windows)
    count = total if n is None else min(n, total)
    index = torch.linspace(0, total - 1, count).round().long().unique()
    x, _ = windows.batch(index)
    return data.scaler.inverse(x)  # type: ignore[return-value]


def check_parity(
    onnx_bytes: bytes,
    module: nn.Module,
    x_raw: Tensor,
    std: np.ndarray,
    *,
    dynamic_channels: bool,
    tolerance: float = PARITY_TOLERANCE,
    what: str = "model",
    batch_size: int = 256,
) -> ParityReport:
    """Compare onnxruntime with torch on raw windows; raise ``ParityError`` above ``tolerance``.

    Errors are divided by each channel's train ``std`` (so they read on the z-scored scale, where
    the metrics live). Besides the full set of windows, a batch of one checks the dynamic batch
    axis and, for channel-independent graphs, one channel and twice the channels check the
    dynamic channel axis.
    """
    session = onnx_session(onnx_bytes)
    module.eval()
    scale = torch.as_tensor(std, dtype=torch.float64).reshape(1, 1, -1)

    def worst(x: Tensor, sd: Tensor) -> float:
        errs = []
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].contiguous()
            with torch.no_grad():
                ref = module(xb).double()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: xb.numpy()})
            if got.shape != tuple(ref.shape):
                return math.inf
            diff = (torch.from_numpy(got).double() - ref).abs() / sd
            if not torch.isfinite(diff).all():
                return math.inf
            errs.append(float(diff.max()))
        return max(errs)

    checks = {"windows": worst(x_raw, scale), "batch_1": worst(x_raw[:1], scale)}
    if dynamic_channels:
        checks["channels_1"] = worst(x_raw[:8, :, :1], scale[:, :, :1])
        doubled = torch.cat([x_raw[:8], x_raw[:8].flip(-1)], dim=-1)  # [8, L, 2C]
        checks["channels_x2"] = worst(doubled, torch.cat([scale, scale.flip(-1)], dim=-1))
    max_err = max(checks.values())
    report = ParityReport(max_err, tolerance, len(x_raw), checks)
    if not max_err <= tolerance:
        raise ParityError(what, max_err, tolerance, checks)
    log.info("%s: ONNX parity ok, max error %.2e on %d windows", what, max_err, len(x_raw))
    return report


def equivariance_error(
    model: nn.Module, graph: ServingGraph, data: PreparedData, x_raw: Tensor
) -> float:
    """Max |served(raw) - model(z-scored) de-normalised| / std: how far serving on raw values is
    from the forecast the metrics were measured on (RevIN's eps is not scale-free)."""
    mean = torch.from_numpy(data.scaler.mean).double()
    std = torch.from_numpy(data.scaler.std).double()
    x = x_raw[:128]
    with torch.no_grad():
        served = graph.module(x).double()
        z = ((x.double() - mean) / std).float()
        ref = model(z).double() * std + mean
    return float(((served - ref).abs() / std).max())


# -- calibration and metrics -------------------------------------------------------------------


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
        preds.append(forecast(x_raw))  # type: ignore[arg-type]
        trues.append(data.scaler.inverse(y))
        var = x_raw.double().var(dim=1, unbiased=False, keepdim=True)  # type: ignore[union-attr]
        scales.append(torch.sqrt(var + WINDOW_STD_EPS))  # [B, 1, C]
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


def calibrate(
    forecast: ForecastFn,
    data: PreparedData,
    *,
    split: str = "val",
    levels: Sequence[int] = CALIBRATION_LEVELS,
) -> dict[str, Any]:
    """Calibrate a raw forecaster on a split (``forecast_split`` + ``calibration_from``)."""
    return calibration_from(forecast_split(forecast, data, split), levels)


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


# -- manifests -----------------------------------------------------------------------------------


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
) -> Manifest:
    """An unregistered manifest (version, sha256 and created_at are set by the store)."""
    channels = graph.manifest_channels
    ch: int | str = channels if channels is not None else "channels"
    return Manifest(
        name=name,
        version=0,  # unregistered: the store numbers it
        sha256=None,  # the store hashes the bytes it is given
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
        calibration=calibration,  # type: ignore[arg-type]
        teachers=[ModelRef.parse(t) if isinstance(t, str) else t for t in teachers],
        parity_max_abs_err=parity.max_abs_err,
        opset=opset,
        created_at=datetime.now(UTC),
        code_version=code_version(),
    )


# -- run folder -> manifest + bytes -> registry ------------------------------------------------


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


def _check_data(model: nn.Module, data: PreparedData, where: str) -> None:
    lookback, horizon = data.config.lookback, data.config.horizon
    if (model.lookback, model.horizon) != (lookback, horizon):
        raise ExportError(
            f"{where}: model has lookback/horizon {model.lookback}/{model.horizon}, "
            f"the data {lookback}/{horizon}"
        )


def export_model(
    model: nn.Module,
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
    tolerance: float = PARITY_TOLERANCE,
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
        config=config if config is not None else asdict(model.cfg),  # type: ignore[call-overload]
        graph=graph,
        data=data,
        metrics=metrics,
        calibration=calibration,
        parity=parity,
        teachers=teachers,
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
    tolerance: float = PARITY_TOLERANCE,
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
    )


def promote(
    store: FilesystemStore, name: str, alias: str, version: int, redis_url: str | None = None
) -> AliasEvent:
    """Point ``alias`` at ``version`` through the Registry (filesystem, then cache + pub/sub)."""
    url = redis_url if redis_url is not None else os.environ.get(REDIS_ENV) or None

    async def run() -> AliasEvent:
        registry = open_registry(str(store.root), url)
        try:
            return await registry.promote(name, alias, version)
        finally:
            await registry.close()

    return asyncio.run(run())


def register_exported(
    exported: ExportedModel,
    store: FilesystemStore,
    *,
    alias: str | None = None,
    redis_url: str | None = None,
) -> Manifest:
    manifest = store.register(exported.manifest, exported.onnx_bytes)
    if alias:
        promote(store, manifest.name, alias, manifest.version, redis_url)
    return manifest


def register_run(
    run_dir: str | os.PathLike[str],
    store: FilesystemStore,
    name: str,
    *,
    alias: str | None = None,
    teachers: Sequence[ModelRef | str] = (),
    data: PreparedData | None = None,
    redis_url: str | None = None,
    parity_windows: int | None = PARITY_WINDOWS,
    tolerance: float = PARITY_TOLERANCE,
) -> Manifest:
    """Export a run folder, refuse it unless it passes the parity check, register it.

    Returns the registered manifest (with its version); ``alias`` is then pointed at it.
    """
    exported = export_run(
        run_dir,
        name,
        data=data,
        teachers=teachers,
        parity_windows=parity_windows,
        tolerance=tolerance,
    )
    return register_exported(exported, store, alias=alias, redis_url=redis_url)


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


def register_ensemble(
    store: FilesystemStore,
    name: str,
    members: Sequence[ModelRef | str],
    *,
    modules: Sequence[nn.Module] | None = None,
    data: PreparedData | None = None,
    val_forecasts: Sequence[SplitForecast] | None = None,
    alias: str | None = None,
    redis_url: str | None = None,
    **fields: Any,
) -> Manifest:
    """Register ``members`` as an ensemble group (no model.onnx; the service averages them).

    With the members' serving ``modules`` (raw in, raw out) and ``data``, the group's manifest
    also carries the ensemble's metrics and its own calibration for intervals.
    """
    refs = [ModelRef.parse(m) if isinstance(m, str) else m for m in members]
    extra: dict[str, Any] = {"config": {"combine": "mean"}, "code_version": code_version()}
    if modules is not None and data is not None:
        extra.update(ensemble_fields(modules, data, val_forecasts))
    manifest = store.register_group(name, refs, **{**extra, **fields})
    if alias:
        promote(store, name, alias, manifest.version, redis_url)
    return manifest


# -- CLI -----------------------------------------------------------------------------------------


def cmd_export(a: argparse.Namespace) -> dict[str, Any]:
    store = FilesystemStore(registry_root(a.registry))
    teachers = [t for t in (a.teachers or "").split(",") if t]
    try:
        manifest = register_run(
            Path(a.run),
            store,
            a.name,
            alias=a.alias,
            teachers=teachers,
            parity_windows=a.parity_windows,
        )
    except RegistryError as exc:
        raise ExportError(f"registry: {exc}") from exc
    return {
        "name": manifest.name,
        "version": manifest.version,
        "alias": a.alias,
        "registry": str(store.root),
        "kind": manifest.kind,
        "architecture": manifest.architecture,
        "channels": manifest.channels,
        "parity_max_abs_err": manifest.parity_max_abs_err,
        "sha256": manifest.sha256,
        **{k: v for k, v in manifest.metrics.items() if k in ("val_mse", "test_mse", "test_mae")},
    }


def add_cli(sub: Any) -> None:
    p = sub.add_parser("export", help="export a run folder to ONNX and register it")
    p.add_argument("--run", required=True, help="run folder (run.json + best.safetensors)")
    p.add_argument("--name", required=True, help="registry name, e.g. etth1-h96")
    p.add_argument(
        "--registry", default=None, help=f"registry root (${REGISTRY_ENV}, else {DEFAULT_REGISTRY})"
    )
    p.add_argument("--alias", default=None, help="point this alias at the new version")
    p.add_argument("--teachers", default=None, help="comma-separated NAME@VERSION of teachers")
    p.add_argument(
        "--parity-windows", type=int, default=PARITY_WINDOWS, help="test windows for parity"
    )
    p.set_defaults(handler=cmd_export)
