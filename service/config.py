"""Service settings: one pydantic-settings model, read from `DISTILCAST_*` environment variables.

Built by `create_app()` (or the cached `get_settings()`), never at import time, so tests and the
benchmark can build apps with different settings in one process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["CUDAExecutionProvider", "CPUExecutionProvider"]


class Settings(BaseSettings):
    """Everything the service can be told. Bad values fail at start-up, not on the first request."""

    model_config = SettingsConfigDict(env_prefix="DISTILCAST_", extra="ignore", frozen=True)

    # Registry and cache.
    registry_root: Path = Path("./var/registry")
    redis_url: str | None = Field(
        default=None, description="None: the embedded in-process cache (single replica)."
    )
    redis_prefix: str = "distilcast:"
    default_model: str | None = Field(
        default=None, description="Served when a request names no model; None: the only student."
    )
    models: tuple[str, ...] = Field(
        default=(), description="Student names to load at start-up; empty: every student found."
    )
    alias_refresh_s: Annotated[float, Field(ge=0)] = Field(
        default=30.0, description="Re-read aliases/versions this often (0: only on events)."
    )

    # Admin.
    admin_token: str | None = Field(default=None, description="None: admin routes answer 403.")
    promotion_tolerance: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description="Relative slack of the promotion gate on production (admin API); None: "
        "$DISTILCAST_PROMOTION_TOLERANCE, else 0.01.",
    )

    # Forecast access: API keys and per-client rate limits.
    api_keys: tuple[str, ...] = Field(
        default=(),
        description="sha256 hex digests of the accepted X-API-Key values (never the keys). "
        "Forecast routes need a key when this is set or api_keys_redis is on.",
    )
    api_keys_redis: bool = Field(
        default=False,
        description="Also accept keys whose sha256 is in the Redis set <redis_prefix>api-keys.",
    )
    rate_limit: str | None = Field(
        default=None,
        description="Per key (per client address without keys), e.g. '100/second' or "
        "'1000 per minute'; counted in Redis when redis_url is set, so replicas share it.",
    )

    # Logs and traces.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = Field(default=False, description="One JSON line per request.")
    configure_logging: bool = Field(
        default=True, description="False leaves logging to the embedding program."
    )

    # Dynamic batcher.
    batch_max_size: Annotated[int, Field(ge=1, le=65536)] = 1024
    batch_max_delay_ms: Annotated[float, Field(ge=0, le=1000)] = 1.0
    batch_max_queue: Annotated[int, Field(ge=1)] = 256
    inline_max_ms: Annotated[float, Field(ge=0)] = Field(
        default=2.0,
        description="Session calls predicted shorter than this run on the event loop thread "
        "(a thread hop costs more than a tiny inference); longer ones run in a worker thread.",
    )

    # Requests.
    default_deadline_ms: Annotated[float, Field(gt=0)] = 50.0
    max_series_per_request: Annotated[int, Field(ge=1)] = 10_000
    max_points_per_request: Annotated[int, Field(ge=1)] = Field(
        default=8_000_000, description="Total input values (time steps x channels) in one request."
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # Admission: the batcher's queue bounds work waiting for inference, not work waiting for the
    # event loop (reading and parsing bodies). Above either bound a forecast request is answered
    # 503 + Retry-After before its body is read, so memory and queueing stay bounded.
    max_in_flight: Annotated[int, Field(ge=1)] = Field(
        default=512, description="Forecast requests handled at once by one worker."
    )
    max_in_flight_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=64 * 1024 * 1024,
        description="Announced body bytes (Content-Length) of the forecast requests handled at "
        "once by one worker; a request is always admitted when none is in flight.",
    )
    drain_timeout_s: Annotated[float, Field(ge=0)] = 10.0
    otel: bool = Field(
        default=False,
        description="OpenTelemetry tracing (needs the otel extra): spans per request and for "
        "decode, inference and encode, exported as OTEL_TRACES_EXPORTER says (console, otlp).",
    )
    fast_path: bool = Field(
        default=True,
        description="Serve POST /v1/forecast[/batch] from an ASGI front door ahead of FastAPI's "
        "per-request machinery (same handlers; False routes them through FastAPI).",
    )

    # Live accuracy (POST /v1/actuals).
    live_accuracy: bool = Field(
        default=True,
        description="Remember forecasts whose series carry time (timestamps, or start + freq) "
        "so that POST /v1/actuals can score them: in Redis when redis_url is set (shared by "
        "workers and replicas), else in this process.",
    )
    accuracy_margin_s: Annotated[float, Field(ge=0)] = Field(
        default=86_400.0,
        description="A remembered forecast lives its own span (last minus first forecast time, "
        "plus one step; numeric times read as seconds) plus this margin, in seconds.",
    )
    accuracy_max_values: Annotated[int, Field(ge=1)] = Field(
        default=20_000_000,
        description="Memory bound: values (forecast values and interval bounds) remembered at "
        "most; past it the forecasts closest to expiring are dropped first.",
    )
    accuracy_alert_factor: Annotated[float, Field(gt=0)] = Field(
        default=1.5,
        description="Exported as distilcast_live_error_alert_factor: the alert "
        "DistilcastLiveErrorAboveValidation fires when a version's rolling MSE on actuals "
        "exceeds this times its validation MSE.",
    )

    # Shadow distillation gap.
    shadow_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01

    # ONNX Runtime.
    ort_intra_threads: Annotated[int, Field(ge=0)] = Field(
        default=1, description="0 lets ONNX Runtime pick (one thread per core)."
    )
    ort_inter_threads: Annotated[int, Field(ge=0)] = 1
    providers: tuple[Provider, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")

    @field_validator("providers")
    @classmethod
    def _providers_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one execution provider is needed")
        if len(set(value)) != len(value):
            raise ValueError("providers must not repeat")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for digest in value:
            digest = digest.strip().lower().removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("api_keys holds sha256 hex digests (64 hex characters), not keys")
            out.append(digest)
        return tuple(out)

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from limits import parse  # imported here: the settings module stays light

        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"rate_limit {value!r}: {exc} (e.g. '100/second')") from None
        return value

    @field_validator("admin_token")
    @classmethod
    def _token_length(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if len(value) < 16:
            raise ValueError("admin_token must be at least 16 characters")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached after the first call)."""
    return Settings()
