"""Every Prometheus metric of the service, declared once (histograms, not summaries).

With `PROMETHEUS_MULTIPROC_DIR` set (scripts/launch_service.sh does it), prometheus-client keeps
values in per-process files and `/metrics` aggregates every worker's; gauges say how (`livesum`,
`livemax`). The directory must exist and be empty when the first worker starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)

REQUEST_DURATION = Histogram(
    "distilcast_request_duration_seconds",
    "HTTP request duration, body read to response built.",
    ["route", "mode", "model", "status"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "distilcast_inference_duration_seconds",
    "One ONNX Runtime call (a whole dynamic batch; ensembles: all members).",
    ["model", "version", "provider"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_ROWS = Histogram(
    "distilcast_batch_rows",
    "Series windows per session call after dynamic batching.",
    ["model"],
    buckets=_ROW_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "distilcast_queue_wait_seconds",
    "Time a request waited in the dynamic batcher before its session call started.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "distilcast_requests_in_flight",
    "Forecast requests being handled.",
    multiprocess_mode="livesum",
)
REJECTIONS = Counter(
    "distilcast_rejections_total",
    "Requests refused, by reason (overloaded, limit_exceeded, invalid_input, ...).",
    ["reason"],
)
REGISTRY_CACHE = Counter(
    "distilcast_registry_cache_total",
    "Registry cache lookups and failures (from Registry.stats): hit, miss, error, fallback.",
    ["result"],
)
REGISTRY_CACHE_UP = Gauge(
    "distilcast_registry_cache_available",
    "1 while the registry cache (Redis or in-process) answers; 0 while serving from disk only.",
    multiprocess_mode="livemin",
)
MODEL_LOADED = Gauge(
    "distilcast_model_loaded",
    "1 for each model version this replica serves, with the provider its sessions run on.",
    ["model", "version", "kind", "provider"],
    multiprocess_mode="livemax",
)
MODEL_LOADS = Counter(
    "distilcast_model_loads_total",
    "Model version loads, by outcome (ok, or the error class of a failed load).",
    ["model", "outcome"],
)
MODEL_SWAPS = Counter(
    "distilcast_model_swaps_total",
    "Alias switches applied by this replica (hot swaps).",
    ["model", "alias"],
)
SHADOW_GAP = Histogram(
    "distilcast_shadow_gap_zmae",
    "Distillation gap on shadowed fast requests: MAE(student, ensemble) / window std.",
    ["model"],
    buckets=_GAP_BUCKETS,
)

# Live accuracy (POST /v1/actuals matched against remembered forecasts). Errors are summed in the
# series' own units; rolling MAE/MSE = rate(error) / rate(points) over any window. `step` is the
# horizon step bucket (service.core.accuracy.step_bucket).
_LIVE = ["model", "version", "mode", "step"]
LIVE_ABS_ERROR = Counter(
    "distilcast_live_abs_error", "Sum of |actual - forecast| over matched values.", _LIVE
)
LIVE_SQUARED_ERROR = Counter(
    "distilcast_live_squared_error", "Sum of (actual - forecast)^2 over matched values.", _LIVE
)
LIVE_POINTS = Counter(
    "distilcast_live_points", "Matched values (actual rows x channels) scored.", _LIVE
)
LIVE_INTERVAL = Counter(
    "distilcast_live_interval_points",
    "Matched values against a remembered interval, by level and result (inside, outside).",
    ["model", "version", "mode", "level", "result"],
)
ACTUALS = Counter(
    "distilcast_actuals",
    "Actuals received, by result: matched (some forecast held it), unmatched, duplicate.",
    ["result"],
)
FORECASTS_REMEMBERED = Counter(
    "distilcast_forecasts_remembered",
    "Served series forecasts remembered for live accuracy, by result (ok, error, dropped: too "
    "many stores in flight).",
    ["result"],
)
VALIDATION_ERROR = Gauge(
    "distilcast_model_validation_error",
    "The version's validation error from its manifest (raw units when the manifest has them: "
    "val_mse_raw / val_mae_raw, else val_mse / val_mae), by metric (mse, mae).",
    ["model", "version", "metric"],
    multiprocess_mode="livemax",
)
LIVE_ALERT_FACTOR = Gauge(
    "distilcast_live_error_alert_factor",
    "DISTILCAST_ACCURACY_ALERT_FACTOR: the live-accuracy alert fires when the rolling MSE "
    "exceeds this times the validation MSE.",
    multiprocess_mode="livemax",
)

_cache_seen: dict[str, int] = {}
_CACHE_RESULTS = ("hit", "miss", "error", "fallback")


def init_series() -> None:
    """Create the labelled cache series at zero, so ratios and rates read 0 rather than no data."""
    for result in _CACHE_RESULTS:
        REGISTRY_CACHE.labels(result)
    for result in ("matched", "unmatched", "duplicate"):
        ACTUALS.labels(result)
    for result in ("ok", "error", "dropped"):
        FORECASTS_REMEMBERED.labels(result)


def sync_cache_stats(stats: Mapping[str, int]) -> None:
    """Turn the registry's cumulative cache counters into counter increments (delta since last)."""
    for key, label in zip(("hits", "misses", "errors", "fallbacks"), _CACHE_RESULTS, strict=True):
        value = int(stats.get(key, 0))
        delta = value - _cache_seen.get(key, 0)
        if delta > 0:
            REGISTRY_CACHE.labels(label).inc(delta)
        _cache_seen[key] = value


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode only)."""
    if multiprocess_dir():
        _mp.mark_process_dead(pid)


class _PrometheusBatch:
    """One served version's session-call series, labelled once at load (not per call)."""

    __slots__ = ("_inference", "_rows", "_wait")

    def __init__(self, name: str, version: int, provider: str) -> None:
        self._inference = INFERENCE_DURATION.labels(name, str(version), provider)
        self._rows = BATCH_ROWS.labels(name)
        self._wait = QUEUE_WAIT.labels(name)

    def on_batch(self, rows: int, seconds: float, waits: Sequence[float]) -> None:
        self._inference.observe(seconds)
        self._rows.observe(rows)
        for w in waits:
            self._wait.observe(w)


class PrometheusObserver:
    """The core's `service.core.observer.Observer`, reported through the metrics above."""

    def batch_observer(self, name: str, version: int, provider: str) -> _PrometheusBatch:
        return _PrometheusBatch(name, version, provider)

    def model_load(self, name: str, outcome: str) -> None:
        MODEL_LOADS.labels(name, outcome).inc()

    def model_loaded(
        self, name: str, version: int, kind: str, provider: str, loaded: bool
    ) -> None:
        MODEL_LOADED.labels(name, str(version), kind, provider).set(1 if loaded else 0)

    def model_swap(self, name: str, alias: str) -> None:
        MODEL_SWAPS.labels(name, alias).inc()

    def shadow_gaps(self, name: str, gaps: Sequence[float]) -> None:
        hist = SHADOW_GAP.labels(name)
        for gap in gaps:
            hist.observe(gap)
