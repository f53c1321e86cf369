"""The FastAPI application: `create_app(settings)`; `app_factory()` for `uvicorn --factory`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

from models_registry.registry import open_registry
from service import metrics, tracing
from service.api import errors
from service.api.access import AccessControl
from service.api.decode import Limits
from service.api.deps import Services
from service.api.evaluation_schemas import schemas as evaluation_schemas
from service.api.limits import BodyLimit, CloseWhenDraining
from service.api.live import LiveAccuracy
from service.api.requestid import RequestId
from service.api.routes import evaluation, forecast, health, models
from service.api.schemas import forecast_example, request_schemas
from service.config import Settings, get_settings
from service.core.accuracy import open_memory
from service.core.engine import EngineOptions
from service.core.pool import ModelPool, PoolOptions
from service.core.predictor import Predictor
from service.logs import configure_logging

log = logging.getLogger(__name__)

DOCS_STATIC = "/docs-static"
# Swagger UI's JS and CSS as shipped in the pinned fastapi-offline wheel: /docs works air-gapped.
_SWAGGER_ASSETS = os.path.join(os.path.dirname(fastapi_offline.__file__), "static")


def _pool_options(s: Settings) -> PoolOptions:
    return PoolOptions(
        engine=EngineOptions(
            providers=tuple(s.providers),
            intra_threads=s.ort_intra_threads,
            inter_threads=s.ort_inter_threads,
        ),
        batch_max_size=s.batch_max_size,
        batch_max_delay_s=s.batch_max_delay_ms / 1000.0,
        batch_max_queue=s.batch_max_queue,
        inline_max_s=s.inline_max_ms / 1000.0,
        models=tuple(s.models),
    )


async def _refresh_loop(services: Services, interval: float) -> None:
    """Catch what events do not carry (a new latest version, a failed load to retry) and export
    the registry cache counters."""
    assert services.pool is not None and services.registry is not None
    while True:
        await asyncio.sleep(interval)
        try:
            await services.pool.refresh()
        except Exception:
            log.exception("periodic registry refresh failed")
        metrics.sync_cache_stats(services.registry.stats.as_dict())
        metrics.REGISTRY_CACHE_UP.set(1 if services.registry.cache.available else 0)


def _stop_accepting(loop: asyncio.AbstractEventLoop, handler: Any) -> None:
    """Stop accepting connections at the signal, on the listening socket itself.

    uvicorn stops accepting at its next tick (up to 0.1 s later) by closing its listening
    sockets. With several workers the supervisor keeps a reference to the shared socket until
    every worker has drained and exited, so the kernel kept completing handshakes no worker
    would accept, and reset them all (the requests written on them lost) when the supervisor
    exited. Here this process leaves its accept loop at once; a single process also shuts the
    socket down (new connections are refused: the client knows nothing was sent), and with
    several workers the supervisor does (service/launch.py), after it has signalled every
    worker: a worker must not, or a lone worker stopped by hand would take the socket from the
    others and from its own replacement. `handler` is uvicorn's `Server.handle_exit`; another
    server leaves this a no-op."""
    server = getattr(handler, "__self__", None)
    single = getattr(getattr(server, "config", None), "workers", None) == 1
    for listener in getattr(server, "servers", ()):
        for sock in listener.sockets:
            fd = sock.fileno()
            if fd < 0:
                continue
            loop.remove_reader(fd)
            if single:
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as shared:
                    shared.shutdown(socket.SHUT_RD)


def _drain_on_signals(services: Services) -> Callable[[], None]:
    """Mark the replica draining as soon as uvicorn gets SIGTERM/SIGINT, not only when the
    lifespan ends (uvicorn first waits for connections): /readyz turns 503 and requests on open
    connections are refused with 503 + `Connection: close` while in-flight ones finish; new
    connections are refused (`_stop_accepting`). Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # served from a thread (tests): the signals are not ours to watch
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if not callable(handler):
            continue

        def on_signal(signum: int, frame: FrameType | None, handler: Any = handler) -> None:
            services.draining = True
            _stop_accepting(loop, handler)
            handler(signum, frame)

        previous[sig] = handler
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


async def _drain(services: Services, timeout: float) -> None:
    services.draining = True
    deadline = time.monotonic() + timeout
    while services.load.value > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _examples(services: Services) -> dict[str, dict[str, Any]]:
    """Request bodies for the docs, shaped for the default model this replica serves."""
    pool, predictor = services.pool, services.predictor
    lookback, channels, name = 96, None, None
    if pool is not None and predictor is not None:
        served = [s for s in pool.served() if s.kind == "student"]
        default = services.settings.default_model or (served[0].name if served else None)
        pick = next((s for s in served if s.name == default), None)
        if pick is not None:
            lookback, channels, name = pick.lookback, pick.channels, pick.name
    return {
        forecast.FORECAST: forecast_example(name, lookback, channels),
        forecast.BATCH: forecast_example(name, lookback, channels, batch=True),
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.configure_logging:
        configure_logging(settings)
    tracing.setup(settings.otel)
    services = Services(
        settings, Limits(settings.max_series_per_request, settings.max_points_per_request)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = open_registry(str(settings.registry_root), settings.redis_url,
                                 settings.redis_prefix)
        executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ort")
        pool = ModelPool(registry, _pool_options(settings), executor=executor,
                         load_hint=services.load.get, observer=metrics.PrometheusObserver())
        predictor = Predictor(
            pool,
            default_model=settings.default_model,
            default_deadline_ms=settings.default_deadline_ms,
            shadow_fraction=settings.shadow_fraction,
            load=services.load,
        )
        registry.subscribe(pool.on_alias_event)
        access = AccessControl(settings)
        services.access = access if access.active else None
        live = None
        if settings.live_accuracy:
            memory = open_memory(settings.redis_url, settings.redis_prefix,
                                 settings.accuracy_max_values)
            live = LiveAccuracy(memory, pool, settings.accuracy_margin_s,
                                settings.accuracy_alert_factor)
        refresher: asyncio.Task[None] | None = None
        restore_signals = _drain_on_signals(services)
        try:
            # Listen first: a promotion made while the models load is then not missed.
            await registry.start()
            await pool.start()
            services.registry, services.pool, services.predictor = registry, pool, predictor
            services.live = live
            if settings.alias_refresh_s > 0:
                refresher = asyncio.create_task(_refresh_loop(services, settings.alias_refresh_s))
            metrics.init_series()
            metrics.sync_cache_stats(registry.stats.as_dict())
            metrics.REGISTRY_CACHE_UP.set(1 if registry.cache.available else 0)
            # Start-up objects (modules, sessions, manifests) live as long as the process: keep
            # them out of the collector's full passes, which large requests otherwise trigger.
            gc.freeze()
            log.info("serving %s from %s (cache: %s)", pool.names(), settings.registry_root,
                     "redis" if settings.redis_url else "in-process")
            yield
        finally:
            restore_signals()
            await _drain(services, settings.drain_timeout_s)
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            await predictor.close()
            await pool.close(settings.drain_timeout_s)
            await registry.close()
            await access.close()
            if live is not None:
                await live.close()
            executor.shutdown(wait=False, cancel_futures=True)
            metrics.mark_process_dead(os.getpid())

    app = FastAPI(
        title="Distilcast",
        version="0.1.0",
        summary="Long-horizon forecasts: distilled MLP students (fast) and their teacher "
        "ensembles (accurate), served with ONNX Runtime.",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks check the global providers on every request (~10-30 us
        # here); the service exports Prometheus metrics itself. DISTILCAST_OTEL=true restores them.
        telemetry=None if settings.otel else {"tracing": False, "metrics": False, "logs": False},
        # /docs is served below from local assets; ReDoc's page loads web fonts: off.
        docs_url=None,
        redoc_url=None,
    )
    app.mount(DOCS_STATIC, StaticFiles(directory=_SWAGGER_ASSETS), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
            # No badge from the public validator service.
            swagger_ui_parameters={"validatorUrl": None},
        )

    app.state.services = services
    errors.install(app)
    handlers = forecast.ForecastHandlers(services)
    app.include_router(forecast.build_router(handlers))
    app.include_router(models.build_router(services))
    app.include_router(health.build_router(services))
    app.include_router(evaluation.build_router(services))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                request_schemas()
            )
            schema["components"]["schemas"].update(evaluation_schemas())
            for path, example in _examples(services).items():
                body = schema["paths"][path]["post"]["requestBody"]["content"]
                body["application/json"]["example"] = example
            if services.pool is not None:
                # Cached only once the models are known, so the example fits the default one.
                app.openapi_schema = schema
            return schema
        return app.openapi_schema

    # (mypy ignore on the next line) FastAPI documents replacing app.openapi to customise the schema
    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, skip=(forecast.FORECAST, forecast.BATCH, evaluation.BACKTEST,
                                        evaluation.ACTUALS))
    if settings.fast_path:
        app.add_middleware(forecast.HotPaths, handlers=handlers)
    app.add_middleware(CloseWhenDraining, draining=lambda: services.draining)
    # Outermost: every answer (fast path, errors, 503s while draining) carries the id.
    app.add_middleware(RequestId, access=settings.access_log)
    return app


def app_factory() -> FastAPI:
    """`uvicorn service.app:app_factory --factory`: settings from the environment."""
    return create_app(get_settings())
