"""Typed exceptions built from the service's error body `{"error": {code, message, field?}}`."""

from __future__ import annotations

from typing import Any


class DistilcastError(Exception):
    """An answer that is not a success. `status` is the HTTP status (0: no answer at all)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None,
                 field: str | None = None, retry_after: float | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after
        where = f" (field {field})" if field else ""
        super().__init__(f"{status} {code or 'error'}: {message}{where}" if status else message)


class BadRequest(DistilcastError):
    """400: the body is not JSON/Arrow or not the endpoint's shape."""


class Unauthorized(DistilcastError):
    """401: missing or wrong credentials."""


class Forbidden(DistilcastError):
    """403."""


class NotFound(DistilcastError):
    """404: unknown model, alias, version or route."""


class Conflict(DistilcastError):
    """409."""


class PayloadTooLarge(DistilcastError):
    """413: body, series or value count above the service's limits."""


class InvalidInput(DistilcastError):
    """422: a value is not acceptable; `field` names it."""


class RateLimited(DistilcastError):
    """429 (retried, honouring Retry-After, until the client's retry budget is spent)."""


class Unavailable(DistilcastError):
    """503: overloaded, shutting down or not ready (retried like 429)."""


class ServerError(DistilcastError):
    """Any other 5xx."""


class Unreachable(DistilcastError):
    """No answer: connection refused, reset or timed out on every try within the retry budget
    (the httpx error is the `__cause__`)."""


class SeriesFailed(DistilcastError):
    """A batch answered, but some series failed. `failures`: [{"id", "error": {...}}];
    `frame`: the forecasts of the series that succeeded."""

    def __init__(self, failures: list[dict[str, Any]], frame: Any) -> None:
        self.failures = failures
        self.frame = frame
        first = failures[0]
        error = first.get("error", {})
        super().__init__(
            f"{len(failures)} series failed; first {first.get('id')!r}: {error.get('message')}",
            status=200, code=error.get("code"), field=error.get("field"),
        )


_BY_STATUS: dict[int, type[DistilcastError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 422: InvalidInput, 429: RateLimited, 503: Unavailable,
}
RETRYABLE = (RateLimited, Unavailable)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: fall back to the client's backoff


def from_response(status: int, body: bytes, retry_after: str | None) -> DistilcastError:
    """The exception for an error answer (any body: JSON error envelope or not)."""
    import json

    code = field = None
    message = body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    try:
        payload = json.loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            code, field = error.get("code"), error.get("field")
            message = str(error.get("message", message))
    except ValueError:
        pass
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else DistilcastError)
    return cls(message, status=status, code=code, field=field,
               retry_after=_retry_after(retry_after))
