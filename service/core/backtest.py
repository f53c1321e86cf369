"""Rolling-origin backtests (POST /v1/backtest), like neuralforecast's `cross_validation`.

A history of n points is cut into `n_windows` forecast windows of `h` steps whose origins move by
`step`; the last window ends at the last point. Window k (0 = oldest) forecasts rows
[s_k, s_k + h) from the `lookback` rows before s_k, where s_k = n - h - step * (n_windows - 1 - k);
its `cutoff` is the time of row s_k - 1 (the last row the model saw). So a history needs at least
lookback + h + step * (n_windows - 1) points.

Torch-free and web-free: the windows go through `Predictor.forecast` like any forecast request,
and the scores are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.core.errors import InvalidInput
from service.core.intervals import window_scale
from service.core.predictor import Predictor
from service.core.timeaxis import Stamp, from_start, from_timestamps
from service.core.types import ForecastRequest, SeriesForecast, SeriesInput

BacktestMode = Literal["fast", "accurate", "both"]


def needed_points(lookback: int, h: int, n_windows: int, step: int) -> int:
    """The shortest history that holds `n_windows` windows of `h` steps `step` apart."""
    return lookback + h + step * (n_windows - 1)


def origins(n: int, h: int, n_windows: int, step: int) -> list[int]:
    """First forecast row of each window, oldest first (the caller checked `needed_points`)."""
    return [n - h - step * (n_windows - 1 - k) for k in range(n_windows)]


@dataclass(slots=True)
class BacktestRequest:
    series: list[SeriesInput]
    h: int | None = None
    n_windows: int = 1
    step: int | None = None
    mode: BacktestMode = "fast"
    model: str | None = None
    levels: list[float] = field(default_factory=list)

    @property
    def modes(self) -> tuple[Literal["fast", "accurate"], ...]:
        return ("fast", "accurate") if self.mode == "both" else (self.mode,)


@dataclass(slots=True)
class Scores:
    """Running sums for MSE, MAE and interval coverage over any set of points."""

    abs_sum: float = 0.0
    sq_sum: float = 0.0
    count: int = 0
    inside: dict[str, int] = field(default_factory=dict)

    def add(self, y: np.ndarray, yhat: np.ndarray,
            bands: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> None:
        err = yhat.astype(np.float64) - y.astype(np.float64)
        self.abs_sum += float(np.abs(err).sum())
        self.sq_sum += float((err * err).sum())
        self.count += int(err.size)
        for level, (lo, hi) in (bands or {}).items():
            hits = int(((y >= lo) & (y <= hi)).sum())
            self.inside[level] = self.inside.get(level, 0) + hits

    def merge(self, other: Scores) -> None:
        self.abs_sum += other.abs_sum
        self.sq_sum += other.sq_sum
        self.count += other.count
        for level, hits in other.inside.items():
            self.inside[level] = self.inside.get(level, 0) + hits

    def as_dict(self) -> dict[str, object]:
        n = max(self.count, 1)
        return {
            "mse": self.sq_sum / n,
            "mae": self.abs_sum / n,
            "coverage": {level: hits / n for level, hits in self.inside.items()},
            "points": self.count,
        }


@dataclass(slots=True)
class Window:
    unique_id: str | int
    cutoff: Stamp
    ds: list[Stamp]
    y: np.ndarray
    """[h, C], or [h] for a univariate series."""
    forecast: dict[str, np.ndarray] = field(default_factory=dict)
    """Mode -> values shaped like `y`."""
    intervals: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    """Mode -> level -> (lower, upper)."""
    gap: dict[str, float] | None = None
    """Both modes: the distillation gap of this window, MAE(fast, accurate) raw and over the
    window's std (zmae, as the shadow gap metric)."""


@dataclass(slots=True)
class BacktestResult:
    h: int
    n_windows: int
    step: int
    models: dict[str, dict[str, object]]
    """Mode -> {model, version, lookback}."""
    windows: list[Window]
    series: dict[str, list[tuple[str | int, Scores]]]
    """Mode -> per series (input order) scores."""
    overall: dict[str, Scores]
    gap: dict[str, float] | None = None


def _times(s: SeriesInput, rows: range) -> list[Stamp]:
    """The stamps of history rows `rows` (positions when the series carries no time)."""
    if s.timestamps is not None:
        return [s.timestamps[i] for i in rows]
    if s.start is not None and s.freq is not None:
        first = rows.start
        axis = from_start(s.start, s.freq, max(first, 1), s.at("start"), s.at("freq"))
        stamps = axis.future(len(rows) + (0 if first >= 1 else 1))
        return stamps if first >= 1 else [s.start, *stamps[: len(rows) - 1]]
    return list(rows)


def _check_time(s: SeriesInput) -> None:
    """The same checks as a forecast's time fields (count, order, calendar), on the history."""
    n = s.values.shape[0]
    if s.timestamps is not None:
        from_timestamps(s.timestamps, n, s.at("timestamps"), s.freq, s.at("freq"))
    elif s.start is not None or s.freq is not None:
        if s.start is None or s.freq is None:
            missing = "start" if s.start is None else "freq"
            raise InvalidInput("start and freq go together", field=s.at(missing))
        from_start(s.start, s.freq, n, s.at("start"), s.at("freq"))


async def run(predictor: Predictor, req: BacktestRequest) -> BacktestResult:
    """Forecast every window of every series in each requested mode and score them."""
    chosen = {mode: await predictor.choose(req.model, mode, len(req.series) * req.n_windows)
              for mode in req.modes}
    first = chosen[req.modes[0]]
    h = req.h if req.h is not None else first.horizon
    for served in chosen.values():
        if h > served.horizon:
            raise InvalidInput(f"h {h} is above {served.label}'s horizon {served.horizon}",
                               field="h")
    step = req.step if req.step is not None else h
    lookback = max(served.lookback for served in chosen.values())
    need = needed_points(lookback, h, req.n_windows, step)
    for s in req.series:
        _check_time(s)
        n = s.values.shape[0]
        if n < need:
            raise InvalidInput(
                f"{n} points; {req.n_windows} windows of h={h} every {step} steps after a "
                f"lookback of {lookback} need at least {need} points", field=s.at("values"))

    windows: list[Window] = []
    inputs: list[SeriesInput] = []
    for s in req.series:
        n = s.values.shape[0]
        for k, start in enumerate(origins(n, h, req.n_windows, step)):
            stamps = _times(s, range(start - 1, start + h))
            y = s.values[start : start + h]
            windows.append(Window(s.id, stamps[0], stamps[1:], y[:, 0] if s.univariate else y))
            # A view of the history up to the origin; the predictor takes its last lookback rows.
            inputs.append(SeriesInput(s.id, s.values[:start], s.univariate,
                                      s.index * req.n_windows + k))

    models: dict[str, dict[str, object]] = {}
    series_scores: dict[str, list[tuple[str | int, Scores]]] = {}
    overall: dict[str, Scores] = {}
    for mode in req.modes:
        forecast_req = ForecastRequest(list(inputs), req.model, mode, h, list(req.levels))
        result = await predictor.forecast(forecast_req)
        models[mode] = {"model": result.model, "version": result.version,
                        "lookback": chosen[mode].lookback}
        total = Scores()
        per_series: list[tuple[str | int, Scores]] = []
        for i, s in enumerate(req.series):
            scores = Scores()
            for k in range(req.n_windows):
                j = i * req.n_windows + k
                out = result.results[j]
                assert isinstance(out, SeriesForecast)
                window = windows[j]
                window.forecast[mode] = out.values
                if out.intervals:
                    window.intervals[mode] = out.intervals
                scores.add(window.y, out.values, out.intervals)
            per_series.append((s.id, scores))
            total.merge(scores)
        series_scores[mode] = per_series
        overall[mode] = total

    gap = None
    if req.mode == "both":
        gap_abs = gap_z = 0.0
        for j, window in enumerate(windows):
            x = inputs[j].values[-chosen["fast"].lookback :]
            diff = np.abs(window.forecast["fast"].astype(np.float64)
                          - window.forecast["accurate"].astype(np.float64))
            if diff.ndim == 1:
                diff = diff[:, None]
            scale = window_scale(x[None])[0]  # [C]
            window.gap = {"mae": float(diff.mean()), "zmae": float((diff / scale).mean())}
            gap_abs += window.gap["mae"]
            gap_z += window.gap["zmae"]
        gap = {"mae": gap_abs / len(windows), "zmae": gap_z / len(windows)}
    return BacktestResult(h, req.n_windows, step, models, windows, series_scores, overall, gap)
