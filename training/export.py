"""Export trained forecasters to ONNX and check them against torch (nothing is registered here).

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

Every export is checked (:func:`check_parity`): onnxruntime and torch forecast the same real test
windows (the full batch, a batch of one, and for channel-independent graphs one channel and twice
the channels), compared where the model computes, in its normalised space, against a tolerance
derived from float32 error growth (:func:`parity_tolerance`). A graph above it is refused
(``ParityError``); the figure goes into the manifest as ``parity_max_abs_err``. Manifests,
calibration and metrics are in ``training.manifests``; registration in ``training.publish``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from training.data import PreparedData

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "x", "y"
PARITY_WINDOWS = 512
WINDOW_STD_EPS = 1e-5
"""The contract's window scale s = sqrt(var + 1e-5): RevIN's statistic, and the service's."""
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
PARITY_SAFETY = 16.0
"""Two float32 implementations each carry the rounding below, in different orders and fusions;
16x the one-sided estimate accepts their honest disagreement (ETTh1: 2e-6 to 2e-5 against
tolerances of ~3e-4) while a wrong graph (a weight off by 0.05) is off by more than 1e-2."""

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
            f"{what}: ONNX parity check failed: max |onnx - torch| in the normalised space = "
            f"{max_abs_err:.3g} > {tolerance:g} ({detail}); refusing to register it"
        )


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
        y: Tensor = self.model(z) * self.std + self.mean  # [B, H, C]
        return y


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
    # (mypy ignore on the next line) nn.Module.__getattr__ is typed Tensor | Module; Forecasters set
    # ints
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
    data: bytes = proto.SerializeToString()
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
    # (mypy ignore on the next line) inverse returns the input's type: a Tensor in, a Tensor out
    return data.scaler.inverse(x)  # type: ignore[return-value]


def graph_depth(module: nn.Module) -> tuple[int, int]:
    """``(layers, longest reduction)``: weighted layers of the graph and the longest sum any
    of them (or the look-back) computes; the inputs of :func:`parity_tolerance`."""
    layers, longest = 0, int(getattr(module, "lookback", 0) or 0)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            layers, longest = layers + 1, max(longest, m.in_features)
        elif isinstance(m, nn.Conv1d):
            fan_in = m.in_channels * int(m.kernel_size[0])
            layers, longest = layers + 1, max(longest, fan_in)
    return max(layers, 1), max(longest, 1)


def parity_tolerance(layers: int, longest: int, conditioning: float) -> float:
    """Largest honest float32 disagreement, in the model's normalised space.

    ``PARITY_SAFETY * eps32 * (conditioning + layers * sqrt(longest))``:

    * ``conditioning`` = max |x| / s over the checked inputs (s: the normalising scale, see
      :func:`check_parity`): normalising ``x`` in float32 loses ``eps * |x|``, which is
      ``eps * |x| / s`` in the normalised space (large for channels whose level dwarfs their
      spread, e.g. a meter reading of 1e4 that moves by 1);
    * ``layers * sqrt(longest)``: a float32 sum of ``n`` terms carries a rounding error of about
      ``eps * sqrt(n)`` of its scale (random rounding), and each weighted layer adds its own.
    """
    return PARITY_SAFETY * FLOAT32_EPS * (max(conditioning, 1.0) + layers * math.sqrt(longest))


def _normalising_scale(x: Tensor, std: Tensor, instance: bool) -> Tensor:
    """``[B, 1, C]`` (instance) or ``[1, 1, C]`` (train scaler) float64 scale of ``x``."""
    if instance:
        var = x.double().var(dim=1, unbiased=False, keepdim=True)  # [B, 1, C]
        return torch.sqrt(var + WINDOW_STD_EPS)
    return std


def check_parity(
    onnx_bytes: bytes,
    module: nn.Module,
    x_raw: Tensor,
    std: np.ndarray,
    *,
    dynamic_channels: bool,
    instance_scaled: bool = True,
    tolerance: float | None = None,
    what: str = "model",
    batch_size: int = 256,
) -> ParityReport:
    """Compare onnxruntime with torch on raw windows; raise ``ParityError`` above the tolerance.

    Differences are read where the model computes: divided by each window's own scale
    ``sqrt(var + 1e-5)`` per channel for scale-equivariant graphs (``instance_scaled``: RevIN's
    statistic), else by the channel's train ``std`` (the z-scored space of the wrapped model).
    ``tolerance`` defaults to :func:`parity_tolerance` of this graph and these windows. Besides
    the full set of windows, a batch of one checks the dynamic batch axis and, for
    channel-independent graphs, one channel and twice the channels check the channel axis.
    """
    session = onnx_session(onnx_bytes)
    module.eval()
    train_std = torch.as_tensor(std, dtype=torch.float64).reshape(1, 1, -1)
    conditioning = float(
        (x_raw.double().abs() / _normalising_scale(x_raw, train_std, instance_scaled)).max()
    )
    if tolerance is None:
        tolerance = parity_tolerance(*graph_depth(module), conditioning)

    def worst(x: Tensor, sd: Tensor) -> float:
        errs = []
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].contiguous()
            with torch.no_grad():
                ref = module(xb).double()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: xb.numpy()})
            if got.shape != tuple(ref.shape):
                return math.inf
            scale = _normalising_scale(xb, sd, instance_scaled)
            diff = (torch.from_numpy(got).double() - ref).abs() / scale
            if not torch.isfinite(diff).all():
                return math.inf
            errs.append(float(diff.max()))
        return max(errs)

    checks = {"windows": worst(x_raw, train_std), "batch_1": worst(x_raw[:1], train_std)}
    if dynamic_channels:
        checks["channels_1"] = worst(x_raw[:8, :, :1], train_std[:, :, :1])
        doubled = torch.cat([x_raw[:8], x_raw[:8].flip(-1)], dim=-1)  # [8, L, 2C]
        checks["channels_x2"] = worst(doubled, torch.cat([train_std, train_std.flip(-1)], dim=-1))
    max_err = max(checks.values())
    report = ParityReport(max_err, tolerance, len(x_raw), checks)
    if not max_err <= tolerance:
        raise ParityError(what, max_err, tolerance, checks)
    log.info(
        "%s: ONNX parity ok, max error %.2e (tolerance %.2e) on %d windows",
        what,
        max_err,
        tolerance,
        len(x_raw),
    )
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
