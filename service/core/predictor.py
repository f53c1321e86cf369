"""The forecasting core: resolve the model for a mode, validate windows, run, add intervals/time.

No HTTP here: requests come in as `ForecastRequest` (numpy windows already decoded) and leave as
`ForecastResult`; every refusal is a `ServiceError` naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from models_registry.errors import RegistryError
from models_registry.store import parse_ref
from service.core.batcher import Timing
from service.core.errors import InvalidInput, ModelNotFound, ServiceError
from service.core.intervals import window_scale
from service.core.models import ServedModel
from service.core.modes import (
    Key,
    Selector,
    ensemble_among,
    group_version_of,
    mode_of,
    no_group,
    route,
)
from service.core.pool import ModelPool
from service.core.timeaxis import TimeAxis, from_start, from_timestamps
from service.core.types import (
    Answered,
    ForecastRequest,
    ForecastResult,
    SeriesFailure,
    SeriesForecast,
    SeriesInput,
)

log = logging.getLogger(__name__)

SHADOW_MAX_ROWS = 64
SHADOW_MAX_TASKS = 4


class LoadCounter:
    """Requests in flight in this process (the HTTP layer counts; the batcher reads it)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def get(self) -> int:
        return self.value


@lru_cache(maxsize=1024)
def _parse_model(ref: str) -> tuple[str, str | int | None]:
    return parse_ref(ref)


@dataclass(slots=True)
class _Prepared:
    index: int
    window: np.ndarray  # [L, C]
    univariate: bool
    axis: TimeAxis | None


@dataclass(slots=True)
class BlockForecast(Answered):
    """`Predictor.forecast_block`'s answer: every window's forecast as one array."""

    values: np.ndarray
    """[N, h, C] float32."""
    bands: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per level label (as `SeriesForecast.intervals` keys it): lower and upper, [N, h, C]."""
    finite: np.ndarray
    """[N] bool: False where the model gave no finite forecast (`nonfinite_error` says why)."""
    label: str


def nonfinite_error(label: str, field: str) -> InvalidInput:
    """Finite inputs can still overflow float32 inside a model (a window statistic of values
    near 1e38): say so, rather than answering with nulls."""
    return InvalidInput(f"{label} gives no finite forecast for these values (too large in "
                        "magnitude for float32 arithmetic)", field=field)


class Predictor:
    def __init__(
        self,
        pool: ModelPool,
        *,
        default_model: str | None = None,
        default_deadline_ms: float = 50.0,
        shadow_fraction: float = 0.0,
        load: LoadCounter | None = None,
        seed: int | None = None,
    ) -> None:
        self.pool = pool
        self.default_model = default_model
        self.default_deadline_ms = default_deadline_ms
        self.shadow_fraction = shadow_fraction
        self.load = load or LoadCounter()
        self._rng = random.Random(seed)
        self._shadows: set[asyncio.Task[None]] = set()

    # -- model resolution ------------------------------------------------------------------------

    def _model_ref(self, model: str | None) -> tuple[str, str | int | None]:
        ref = model or self.default_model or self.pool.default_name()
        if ref is None:
            raise InvalidInput("model is required (this replica serves several)", field="model")
        try:
            return _parse_model(ref)
        except RegistryError as exc:
            raise InvalidInput(str(exc), field="model") from None

    async def _group_for_version(self, student: Key) -> Key:
        """The ensemble a student version was distilled from (its manifest's `teachers`)."""
        pool = self.pool
        teachers = [(t.name, t.version) for t in (await pool.manifest(student)).teachers]
        direct = ensemble_among(teachers, lambda ref: pool.kind(ref[0]))
        if direct is not None:
            return direct
        group = pool.group_of(student[0])
        view = pool.view(group) if group else None
        if group and view and teachers:
            candidates = [
                (v, [(m.name, m.version) for m in (await pool.manifest((group, v))).members])
                for v in view.versions
            ]
            version = group_version_of(teachers, candidates)
            if version is not None:
                return group, version
        raise no_group(student)

    async def _key(self, name: str, kind: str, mode: Literal["fast", "accurate"],
                   selector: Selector) -> Key:
        """The version `mode` serves for `name@selector` (`service.core.modes.route`)."""
        r = route(name, kind, mode, selector, has_group=self.pool.group_of(name) is not None)
        key = await self.pool.resolve(r.name, r.selector)
        return await self._group_for_version(key) if r.by_teachers else key

    async def _choose(self, req: ForecastRequest, rows: int) -> ServedModel:
        name, selector = self._model_ref(req.model)
        pool = self.pool
        kind = pool.kind(name)
        if kind is None:
            raise ModelNotFound(f"unknown model {name!r}", field="model")
        if req.mode != "auto":
            return await pool.obtain(await self._key(name, kind, req.mode, selector))
        if kind == "ensemble":
            return await pool.obtain(await self._key(name, kind, "accurate", selector))
        # auto: accurate when its predicted queue wait + compute fits the budget, else fast.
        fast = await pool.obtain(await self._key(name, kind, "fast", selector))
        accurate: ServedModel | None
        try:
            accurate = await pool.obtain(await self._key(name, kind, "accurate", selector))
        except ServiceError:
            accurate = None
        if accurate is None or (req.levels and accurate.calibration is None):
            return fast
        budget = req.deadline_ms if req.deadline_ms is not None else self.default_deadline_ms
        predicted_ms = accurate.batcher.predicted_latency_s(rows) * 1000.0
        return accurate if predicted_ms <= budget else fast

    async def choose(self, model: str | None, mode: Literal["fast", "accurate"],
                     rows: int = 1) -> ServedModel:
        """The model a request naming `model` in `mode` would run on (its lookback and horizon
        let a backtest size its windows before forecasting them)."""
        return await self._choose(ForecastRequest([], model, mode), rows)

    # -- validation ------------------------------------------------------------------------------

    @staticmethod
    def _check_horizon(req: ForecastRequest, served: ServedModel) -> int:
        if req.horizon is None:
            return served.horizon
        if req.horizon > served.horizon:
            raise InvalidInput(
                f"horizon {req.horizon} is above the model's {served.horizon}", field="horizon"
            )
        return req.horizon

    @staticmethod
    def _check_levels(req: ForecastRequest, served: ServedModel, horizon: int) -> list[int]:
        if not req.levels:
            return []
        if served.calibration is None:
            raise InvalidInput(f"{served.label} has no calibration for intervals", field="level")
        return served.calibration.check_levels(req.levels, horizon)

    @staticmethod
    def _check_shape(served: ServedModel, n: int, channels: int, field: str) -> None:
        """A window of `n` points and `channels` channels fits `served`, or InvalidInput."""
        if served.channels is not None and channels != served.channels:
            raise InvalidInput(
                f"{channels} channels, {served.label} expects {served.channels}", field=field
            )
        if n < served.lookback:
            raise InvalidInput(
                f"{n} points, {served.label} needs at least its lookback {served.lookback}",
                field=field,
            )

    @staticmethod
    def _prepare(index: int, s: SeriesInput, served: ServedModel, horizon: int) -> _Prepared:
        n, channels = s.values.shape
        Predictor._check_shape(served, n, channels, s.at("values"))
        axis: TimeAxis | None = None
        if s.timestamps is not None:
            axis = from_timestamps(s.timestamps, n, s.at("timestamps"), s.freq, s.at("freq"))
        elif s.start is not None or s.freq is not None:
            if s.start is None or s.freq is None:
                missing = "start" if s.start is None else "freq"
                raise InvalidInput("start and freq go together", field=s.at(missing))
            axis = from_start(s.start, s.freq, n, s.at("start"), s.at("freq"))
        if axis is not None:
            axis.check(horizon, s.at("timestamps" if s.timestamps is not None else "start"))
        return _Prepared(index, s.values[n - served.lookback :], s.univariate, axis)

    # -- the request -----------------------------------------------------------------------------

    async def forecast(self, req: ForecastRequest, *, partial: bool = False) -> ForecastResult:
        """Forecast every series. `partial`: a bad series becomes a failure entry (batch);
        otherwise the first bad series fails the request."""
        valid = sum(1 for s in req.series if isinstance(s, SeriesInput))
        served = await self._choose(req, valid)
        with served.use():
            horizon = self._check_horizon(req, served)
            level_rows = self._check_levels(req, served, horizon)
            results: list[SeriesForecast | SeriesFailure | None] = [None] * len(req.series)
            groups: dict[int, list[_Prepared]] = {}
            for i, s in enumerate(req.series):
                if isinstance(s, SeriesFailure):
                    if not partial:
                        raise s.error
                    results[i] = s
                    continue
                try:
                    p = self._prepare(i, s, served, horizon)
                except ServiceError as exc:
                    if not partial:
                        raise
                    results[i] = SeriesFailure(s.id, exc)
                    continue
                groups.setdefault(p.window.shape[1], []).append(p)
            batches = [
                (g, g[0].window[None] if len(g) == 1 else np.stack([p.window for p in g]))
                for g in groups.values()
            ]
            if not batches:  # every series failed validation
                outs = []
            elif len(batches) == 1:
                outs = [await served.batcher.submit(batches[0][1])]
            else:
                outs = list(await asyncio.gather(*(served.batcher.submit(x) for _, x in batches)))
        queue_s = compute_s = 0.0
        for (group, x), (y, timing) in zip(batches, outs, strict=True):
            self._finish(req, served, group, x, y, horizon, level_rows, results, partial)
            queue_s, compute_s = self._worst(timing, queue_s, compute_s)
            if served.kind != "ensemble" and self.shadow_fraction > 0:
                self._maybe_shadow(served, x, y)
        return ForecastResult(
            model=served.name,
            version=served.version,
            mode=mode_of(served.kind),
            provider=served.provider,
            horizon=horizon,
            results=results,  # type: ignore[arg-type]  # every slot is filled by now
            queue_ms=queue_s * 1000.0,
            inference_ms=compute_s * 1000.0,
        )

    async def forecast_block(self, windows: np.ndarray, *, model: str | None,
                             mode: Literal["fast", "accurate", "auto"], horizon: int | None,
                             levels: list[float]) -> BlockForecast:
        """Many windows of one shape, [N, L, C] float32 with L >= the model's lookback, in one
        call: the same model choice, checks, session call, intervals and finiteness test as
        `forecast`, with no per-series Python (what the batch job scores whole blocks with).
        A check that fails raises for the whole block; a window the model gives no finite
        forecast for is flagged in `finite`."""
        req = ForecastRequest([], model, mode, horizon, levels)
        n, length, channels = windows.shape
        served = await self._choose(req, n)
        with served.use():
            h = self._check_horizon(req, served)
            level_rows = self._check_levels(req, served, h)
            self._check_shape(served, length, channels, "values")
            x = windows[:, length - served.lookback :]
            if n:
                y, _ = await served.batcher.submit(x)
            else:
                y = np.zeros((0, h, channels), np.float32)
        yh, bands, finite = self._outputs(served, x, y, h, level_rows)
        return BlockForecast(
            model=served.name, version=served.version,
            mode=mode_of(served.kind), provider=served.provider, horizon=h, values=yh,
            bands={f"{level:g}": band for level, band in zip(levels, bands, strict=True)},
            finite=finite, label=served.label,
        )

    @staticmethod
    def _outputs(served: ServedModel, x: np.ndarray, y: np.ndarray, horizon: int,
                 level_rows: list[int]
                 ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """(forecasts [B, h, C], per level its (lower, upper) [B, h, C], [B] all finite)."""
        yh = y[:, :horizon]  # [B, h, C]
        bands = []
        if level_rows:
            assert served.calibration is not None
            with np.errstate(over="ignore", invalid="ignore"):
                bands = served.calibration.bands(yh, window_scale(x), level_rows)
        # (isfinite never warns.)
        finite = np.isfinite(yh).all(axis=(1, 2))
        for lo, hi in bands:
            finite &= np.isfinite(lo).all(axis=(1, 2)) & np.isfinite(hi).all(axis=(1, 2))
        return yh, bands, finite

    @staticmethod
    def _worst(timing: Timing, queue_s: float, compute_s: float) -> tuple[float, float]:
        return max(queue_s, timing.queue_s), max(compute_s, timing.compute_s)

    def _finish(
        self,
        req: ForecastRequest,
        served: ServedModel,
        group: list[_Prepared],
        x: np.ndarray,
        y: np.ndarray,
        horizon: int,
        level_rows: list[int],
        results: list[SeriesForecast | SeriesFailure | None],
        partial: bool,
    ) -> None:
        yh, bands, finite = self._outputs(served, x, y, horizon, level_rows)
        labels = [f"{level:g}" for level in req.levels]
        for b, p in enumerate(group):
            s = req.series[p.index]
            assert isinstance(s, SeriesInput)
            if not finite[b]:
                error = nonfinite_error(served.label, s.at("values"))
                if not partial:
                    raise error
                results[p.index] = SeriesFailure(s.id, error)
                continue
            values = yh[b, :, 0] if p.univariate else yh[b]
            intervals = None
            if bands:
                intervals = {
                    label: (lo[b, :, 0], hi[b, :, 0]) if p.univariate else (lo[b], hi[b])
                    for label, (lo, hi) in zip(labels, bands, strict=True)
                }
            results[p.index] = SeriesForecast(
                s.id,
                values,
                p.axis.future(horizon) if p.axis is not None else None,
                intervals,
            )

    # -- shadow distillation gap -----------------------------------------------------------------

    def _maybe_shadow(self, student: ServedModel, x: np.ndarray, y: np.ndarray) -> None:
        if self._rng.random() >= self.shadow_fraction:
            return
        group = self.pool.group_of(student.name)
        if group is None:
            return
        try:
            ensemble = self.pool.get(self.pool.lookup(group, None))
        except ServiceError:
            return
        if ensemble is None or len(self._shadows) >= SHADOW_MAX_TASKS:
            return
        if ensemble.batcher.queue_len * 2 >= ensemble.batcher.max_queue:
            return  # never let the shadow traffic crowd out real requests
        x, y = x[:SHADOW_MAX_ROWS], y[:SHADOW_MAX_ROWS]
        task = asyncio.create_task(self._shadow(student.name, ensemble, x, y))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, model: str, ensemble: ServedModel, x: np.ndarray, y: np.ndarray
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            with ensemble.use():
                # A worker thread, never the event loop: teachers can take milliseconds.
                ye = await loop.run_in_executor(self.pool.executor, ensemble.run, x)
        except Exception:
            log.warning("shadow run on %s failed", ensemble.label, exc_info=True)
            return
        if ye.shape != y.shape:
            return
        scale = window_scale(x)[:, None, :]  # [B, 1, C]
        gaps = (np.abs(y - ye) / scale).mean(axis=(1, 2))
        self.pool.observer.shadow_gaps(model, gaps.tolist())

    async def close(self) -> None:
        for task in list(self._shadows):
            task.cancel()
        if self._shadows:
            await asyncio.wait(set(self._shadows), timeout=1.0)
