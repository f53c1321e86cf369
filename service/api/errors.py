"""The one place where exceptions become HTTP answers: `{"error": {code, message, field?}}`."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from models_registry import errors as reg
from service import metrics
from service.core import errors as core

log = logging.getLogger(__name__)

STATUS: dict[type[core.ServiceError], int] = {
    core.InvalidInput: 422,
    core.MalformedBody: 400,
    core.LimitExceeded: 413,
    core.ModelNotFound: 404,
    core.ModelUnavailable: 503,
    core.Overloaded: 503,
    core.ShuttingDown: 503,
    core.Unauthorized: 401,
    core.Forbidden: 403,
    core.Conflict: 409,
    core.RateLimited: 429,
    core.StorageFull: 507,
}
_REJECTED = (core.Overloaded, core.LimitExceeded, core.ShuttingDown, core.Unauthorized,
             core.Forbidden, core.RateLimited)


def from_registry(exc: reg.RegistryError, field: str | None = None) -> core.ServiceError:
    """Registry errors seen by admin/model routes, in core terms."""
    if isinstance(exc, reg.ModelNotFound):
        return core.ModelNotFound(str(exc), field=field)
    if isinstance(exc, reg.InvalidName):
        return core.InvalidInput(str(exc), field=field)
    if isinstance(exc, reg.StorageFull):
        return core.StorageFull(str(exc))
    return core.Conflict(str(exc), field=field)


def status_of(exc: core.ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def json_error(status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> Response:
    body: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return Response(orjson.dumps({"error": body}), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(exc: core.ServiceError) -> Response:
    status = status_of(exc)
    headers = None
    if isinstance(exc, core.Overloaded | core.RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, core.Unauthorized):
        headers = {"WWW-Authenticate": "ApiKey" if exc.field == "X-API-Key" else "Bearer"}
    elif isinstance(exc, core.ModelUnavailable | core.ShuttingDown):
        headers = {"Retry-After": "1"}
    if isinstance(exc, _REJECTED):
        metrics.REJECTIONS.labels(exc.code).inc()
    return json_error(status, exc.code, exc.message, exc.field, headers)


def install(app: FastAPI) -> None:
    """Exception handlers for the routes that do not catch errors themselves."""

    async def service_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, core.ServiceError)
        return error_response(exc)

    async def registry_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, reg.RegistryError)
        return error_response(from_registry(exc))

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        field = ".".join(loc) or "body"
        return error_response(core.InvalidInput(str(first.get("msg")), field=field))

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 413: "limit_exceeded"}.get(
            exc.status_code, "http_error")
        return json_error(exc.status_code, code, str(exc.detail), None,
                          dict(exc.headers) if exc.headers else None)

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return json_error(500, "internal", "internal error")

    app.add_exception_handler(core.ServiceError, service_error)
    app.add_exception_handler(reg.RegistryError, registry_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
