"""POST /v1/forecast and /v1/forecast/batch: the hot path.

The handlers read the raw body and build the raw response themselves: neither pydantic nor
jsonable_encoder touch the float arrays. FastAPI documents the routes (schemas in
`openapi_extra` / `response_model`); `HotPaths` serves them ahead of FastAPI's per-request
machinery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.api import decode, encode
from service.api.deps import Services
from service.api.errors import error_response, json_error
from service.api.schemas import BatchIn, BatchOut, ErrorOut, ForecastIn, ForecastOut, body_doc
from service.core.errors import LimitExceeded, MalformedBody, ServiceError, ShuttingDown
from service.core.types import ForecastRequest
from service.tracing import span

log = logging.getLogger(__name__)

class Decoder(Protocol):
    def __call__(self, body: bytes, limits: decode.Limits, *, msgpack: bool = ...
                 ) -> ForecastRequest: ...


MSGPACK = "application/msgpack"
ARROW = "application/vnd.apache.arrow.stream"
Handler = Callable[[Scope, Receive], Awaitable[Response]]
FORECAST = "/v1/forecast"
BATCH = "/v1/forecast/batch"

OK_CONTENT: dict[int | str, dict[str, Any]] = {200: {"content": {"application/msgpack": {}}}}
BATCH_OK: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/msgpack": {}, ARROW: {}}}
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Body is not JSON / not the endpoint's shape"},
    404: {"model": ErrorOut, "description": "Unknown model, alias or version"},
    413: {"model": ErrorOut, "description": "Body, series or value count above the limits"},
    422: {"model": ErrorOut, "description": "A value is not acceptable; `field` names it"},
    503: {"model": ErrorOut, "description": "Overloaded (see Retry-After) or not ready"},
}


class RawRoute(APIRoute):
    """An APIRoute whose endpoint receives the Request and returns the Response itself."""

    # (mypy ignore on the next line) the raw route's handler is the endpoint itself (Request ->
    # Response), narrower than APIRoute's
    def get_route_handler(self) -> Callable[[Request], object]:  # type: ignore[override]
        return self.endpoint


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            found: bytes = value
            return found
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _wants_msgpack(scope: Scope, header: bytes) -> bool:
    value = _header(scope, header)
    return value is not None and b"msgpack" in value


def _is_arrow(scope: Scope, header: bytes) -> bool:
    value = _header(scope, header)
    return value is not None and b"arrow" in value


def _wants_json(scope: Scope) -> bool:
    """An Arrow request answered in JSON when asked (`Accept: application/json`)."""
    value = _header(scope, b"accept")
    return value is not None and b"json" in value and b"arrow" not in value


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes (before reading it when Content-Length says)."""
    length = _content_length(scope)
    if length is not None and length > limit:
        raise LimitExceeded(f"body of {length} bytes; the limit is {limit}", field="body")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedBody("client disconnected", field="body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise LimitExceeded(f"body above the limit of {limit} bytes", field="body")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ForecastHandlers:
    """The two forecast handlers on raw ASGI (scope, receive) -> Response, shared by the FastAPI
    routes and the `HotPaths` front door."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.routes: dict[str, Handler] = {
            FORECAST: self.forecast,
            BATCH: self.batch,
        }

    async def forecast(self, scope: Scope, receive: Receive) -> Response:
        return await self._handle(scope, receive, FORECAST, decode.forecast_request, False)

    async def batch(self, scope: Scope, receive: Receive) -> Response:
        return await self._handle(scope, receive, BATCH, decode.batch_request, True)

    async def _handle(self, scope: Scope, receive: Receive, route: str, decoder: Decoder,
                      partial: bool) -> Response:
        services = self.services
        t0 = time.perf_counter()
        services.load.value += 1
        metrics.IN_FLIGHT.inc()
        mode, model, status = "unknown", "unknown", 200
        reserved = 0
        try:
            if services.draining:
                raise ShuttingDown("the replica is shutting down")
            predictor = services.need_predictor()
            if services.access is not None:
                await services.access.check(scope)
            reserved = services.admit(_content_length(scope))
            with span(route):
                body = await read_body(scope, receive, services.settings.max_body_bytes)
                layout = None
                with span("decode"):
                    if partial and _is_arrow(scope, b"content-type"):
                        # Imported on first use: pyarrow costs the JSON-only replica nothing.
                        from service.api import arrow

                        req, layout = arrow.batch_request(body, services.limits,
                                                          scope.get("query_string", b""))
                    else:
                        req = decoder(body, services.limits,
                                      msgpack=_wants_msgpack(scope, b"content-type"))
                mode = req.mode
                with span("inference"):
                    result = await predictor.forecast(req, partial=partial)
                mode, model = result.mode, result.model
                if layout is not None and (services.live is not None or _wants_json(scope)):
                    from service.api import arrow

                    # JSON answers carry ISO text, as JSON requests get; Arrow answers' times
                    # are in their own ds column, these only feed the live-accuracy memory.
                    arrow.attach_times(result, layout, iso=_wants_json(scope))
                if services.live is not None:
                    # Series with time are remembered for POST /v1/actuals, after the answer.
                    services.live.remember(result)
                total_ms = (time.perf_counter() - t0) * 1000.0
                with span("encode"):
                    if layout is not None and not _wants_json(scope):
                        from service.api import arrow

                        response = Response(arrow.forecast_arrow(result, layout, total_ms),
                                            media_type=ARROW)
                    elif _wants_msgpack(scope, b"accept"):
                        response = Response(encode.forecast_msgpack(result, total_ms),
                                            media_type=MSGPACK)
                    else:
                        response = Response(encode.forecast_body(result, total_ms),
                                            media_type="application/json")
        except ServiceError as exc:
            response = error_response(exc)
            status = response.status_code
        except Exception:
            log.exception("%s failed", route)
            response = json_error(500, "internal", "internal error")
            status = 500
        finally:
            services.load.value -= 1
            services.release(reserved)
            metrics.IN_FLIGHT.dec()
        metrics.REQUEST_DURATION.labels(route, mode, model, str(status)).observe(
            time.perf_counter() - t0
        )
        return response


class HotPaths:
    """ASGI front door for POST /v1/forecast[/batch]: calls the handlers directly.

    FastAPI's per-request machinery (middleware stack, router, route wrappers) costs ~30-50 us
    per call here, a sixth of the whole JSON-over-HTTP floor for a 336 x 7 body; the FastAPI
    routes stay (OpenAPI, and the same handlers when this is off: `fast_path=False`).
    """

    def __init__(self, app: ASGIApp, handlers: ForecastHandlers) -> None:
        self.app = app
        self.routes = handlers.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                response = await handler(scope, receive)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def batch_doc() -> dict[str, Any]:
    doc = body_doc(BatchIn)
    doc["requestBody"]["content"][ARROW] = {
        "schema": {"type": "string", "format": "binary",
                   "description": "Arrow IPC stream, long form: unique_id, ds?, value columns"}
    }
    return doc


def build_router(handlers: ForecastHandlers) -> APIRouter:
    router = APIRouter(route_class=RawRoute, tags=["forecast"])

    @router.post(
        FORECAST,
        response_model=ForecastOut,
        responses={**OK_CONTENT, **ERRORS},
        openapi_extra=body_doc(ForecastIn),
        summary="Forecast one or a few series",
    )
    async def forecast(request: Request) -> Response:
        """Forecast each series with the student (fast), the teacher ensemble (accurate), or
        whichever fits `deadline_ms` (auto). Any bad series fails the request with 422."""
        return await handlers.forecast(request.scope, request.receive)

    @router.post(
        BATCH,
        response_model=BatchOut,
        responses={**BATCH_OK, **ERRORS},
        openapi_extra=batch_doc(),
        summary="Forecast many series (row or columnar form)",
    )
    async def forecast_batch(request: Request) -> Response:
        """Many series in one call. Results come back in input order; a bad series gets an
        `error` entry instead of failing the batch.

        Also Arrow IPC (`Content-Type: application/vnd.apache.arrow.stream`): long form
        (`unique_id`, optional `ds`, value columns), options in the query string (`model`,
        `mode`, `h`, `level` repeated, `deadline_ms`); answered in Arrow with the batch job's
        columns (`<col>-lo-<level>`/`<col>-hi-<level>`), model, version and failures in the
        schema metadata, or in JSON with `Accept: application/json`."""
        return await handlers.batch(request.scope, request.receive)

    return router
