"""Live accuracy in the web layer: remember served forecasts, score actuals into Prometheus.

The core (`service.core.accuracy`) stores and matches; this module owns the metric updates, so
the core never imports the exporter.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from service import metrics
from service.api.evaluation_schemas import ActualsWire
from service.core.accuracy import ForecastMemory, records, step_bucket, time_key
from service.core.errors import InvalidInput, ModelUnavailable
from service.core.pool import ModelPool
from service.core.types import ForecastResult, SeriesForecast

log = logging.getLogger(__name__)

MAX_PENDING = 64


@dataclass(slots=True)
class _Sums:
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    points: int = 0
    inside: dict[str, int] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)


class LiveAccuracy:
    def __init__(self, memory: ForecastMemory, pool: ModelPool, margin_s: float,
                 alert_factor: float) -> None:
        self.memory = memory
        self.pool = pool
        self.margin_s = margin_s
        self._seen_labels: set[tuple[str, int, str, int, tuple[str, ...]]] = set()
        self._seen_versions: set[tuple[str, int]] = set()
        self._pending: set[asyncio.Task[None]] = set()
        metrics.LIVE_ALERT_FACTOR.set(alert_factor)

    def remember(self, result: ForecastResult) -> None:
        """Remember the forecasts of `result` that carry time, just after the answer: a task on
        this event loop, so the answer does not wait for the store (bench/evaluation.py times
        a 1000-series answer). Never fails the forecast; past MAX_PENDING stores in
        flight, forecasts are dropped (counted) rather than queued without bound."""
        timed = sum(1 for r in result.results if isinstance(r, SeriesForecast) and r.timestamps)
        if not timed:
            return
        if len(self._pending) >= MAX_PENDING:
            metrics.FORECASTS_REMEMBERED.labels("dropped").inc(timed)
            return
        task = asyncio.create_task(self._store(result))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait for this process's stores in flight (an actual right after its forecast, on the
        same worker, then finds it)."""
        if self._pending:
            await asyncio.wait(set(self._pending))

    async def _store(self, result: ForecastResult) -> None:
        recs = records(result, self.margin_s)
        try:
            await self._prepare_series(result, recs[0].intervals.keys())
            await self.memory.remember(recs)
        except Exception:
            log.warning("remembering %d forecasts of %s@%s failed", len(recs), result.model,
                        result.version, exc_info=True)
            metrics.FORECASTS_REMEMBERED.labels("error").inc(len(recs))
            return
        metrics.FORECASTS_REMEMBERED.labels("ok").inc(len(recs))

    async def _prepare_series(self, result: ForecastResult, levels: Any) -> None:
        """Create this model's error series at zero before any actual arrives (a counter first
        seen at its final value has no increase for rate()), and export its validation error."""
        key = (result.model, result.version, result.mode, result.horizon, tuple(sorted(levels)))
        if key not in self._seen_labels:
            self._seen_labels.add(key)
            labels = (result.model, str(result.version), result.mode)
            for bucket in sorted({step_bucket(s) for s in range(1, result.horizon + 1)}):
                metrics.LIVE_ABS_ERROR.labels(*labels, bucket)
                metrics.LIVE_SQUARED_ERROR.labels(*labels, bucket)
                metrics.LIVE_POINTS.labels(*labels, bucket)
            for level in key[4]:
                for outcome in ("inside", "outside"):
                    metrics.LIVE_INTERVAL.labels(*labels, level, outcome)
        version = (result.model, result.version)
        if version not in self._seen_versions:
            self._seen_versions.add(version)
            found = (await self.pool.manifest(version)).metrics
            for metric in ("mse", "mae"):
                value = found.get(f"val_{metric}_raw", found.get(f"val_{metric}"))
                if value is not None:
                    metrics.VALIDATION_ERROR.labels(result.model, str(result.version),
                                                    metric).set(value)

    async def actuals(self, wire: ActualsWire) -> dict[str, Any]:
        """Match each actual with the remembered forecasts holding it and score the pairs."""
        await self.flush()
        keys: list[tuple[str, float]] = []
        ys: list[np.ndarray] = []
        for i, a in enumerate(wire.actuals):
            keys.append((str(a.unique_id), time_key(a.ds, f"actuals[{i}].ds")))
            y = np.atleast_1d(np.asarray(a.values, dtype=np.float64))
            if y.size == 0 or not np.isfinite(y).all():
                raise InvalidInput("values must be finite numbers (one per channel)",
                                   field=f"actuals[{i}].values")
            ys.append(y)
        try:
            outcomes = await self.memory.match(keys)
        except RedisError as exc:
            # Nothing was scored: the caller may send the same actuals again.
            raise ModelUnavailable(f"the live-accuracy store (Redis) is unavailable: {exc}",
                                   field=None) from None
        sums: dict[tuple[str, int, str, str], _Sums] = {}
        matched = duplicates = pairs = unmatched = 0
        for y, outcome in zip(ys, outcomes, strict=True):
            duplicates += outcome.duplicates
            scored = False
            for pair in outcome.pairs:
                f = pair.forecast.astype(np.float64)
                if f.shape != y.shape:
                    continue  # another channel count than this forecast: not its actual
                rec = pair.record
                s = sums.setdefault((rec.model, rec.version, rec.mode, step_bucket(pair.step + 1)),
                                    _Sums())
                err = y - f
                s.abs_sum += float(np.abs(err).sum())
                s.sq_sum += float((err * err).sum())
                s.points += int(y.size)
                for level, (lo, hi) in rec.intervals.items():
                    inside = int(((y >= lo[pair.step]) & (y <= hi[pair.step])).sum())
                    s.inside[level] = s.inside.get(level, 0) + inside
                    s.outside[level] = s.outside.get(level, 0) + int(y.size) - inside
                pairs += 1
                scored = True
            matched += scored
            # An actual reported again (only duplicate pairs) is neither matched nor unmatched.
            unmatched += not scored and not outcome.duplicates
        metrics.ACTUALS.labels("matched").inc(matched)
        metrics.ACTUALS.labels("unmatched").inc(unmatched)
        metrics.ACTUALS.labels("duplicate").inc(duplicates)
        by_model: dict[tuple[str, int, str], _Sums] = {}
        for (model, version, mode, bucket), s in sums.items():
            labels = (model, str(version), mode)
            metrics.LIVE_ABS_ERROR.labels(*labels, bucket).inc(s.abs_sum)
            metrics.LIVE_SQUARED_ERROR.labels(*labels, bucket).inc(s.sq_sum)
            metrics.LIVE_POINTS.labels(*labels, bucket).inc(s.points)
            total = by_model.setdefault((model, version, mode), _Sums())
            total.abs_sum += s.abs_sum
            total.sq_sum += s.sq_sum
            total.points += s.points
            for level in s.inside:
                metrics.LIVE_INTERVAL.labels(*labels, level, "inside").inc(s.inside[level])
                metrics.LIVE_INTERVAL.labels(*labels, level, "outside").inc(s.outside[level])
                total.inside[level] = total.inside.get(level, 0) + s.inside[level]
        return {
            "received": len(ys),
            "matched": matched,
            "unmatched": unmatched,
            "duplicates": duplicates,
            "pairs": pairs,
            "errors": [
                {"model": model, "version": version, "mode": mode, "points": t.points,
                 "mae": t.abs_sum / t.points, "mse": t.sq_sum / t.points,
                 "coverage": {k: v / t.points for k, v in t.inside.items()}}
                for (model, version, mode), t in sorted(by_model.items())
            ],
        }

    async def close(self) -> None:
        await self.flush()
        await self.memory.close()
