"""Core exceptions. The HTTP layer maps them to status codes in one place (`service.api.errors`)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the core raises on purpose; `code` is the stable machine name."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class InvalidInput(ServiceError):
    """The request is well-formed JSON but a value is not acceptable (422)."""

    code = "invalid_input"


class MalformedBody(ServiceError):
    """The body is not JSON, or not the JSON shape of the endpoint (400)."""

    code = "malformed_body"


class LimitExceeded(ServiceError):
    """Body bytes, series count or value count above the configured limits (413)."""

    code = "limit_exceeded"


class ModelNotFound(ServiceError):
    """The request names a model, alias or version the registry does not have (404)."""

    code = "model_not_found"


class ModelUnavailable(ServiceError):
    """The registry has the model but this replica cannot serve it right now (503)."""

    code = "model_unavailable"


class Overloaded(ServiceError):
    """The batcher queue is full: answer 503 with Retry-After instead of queueing forever."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class RateLimited(ServiceError):
    """This client's rate limit is spent: 429 with Retry-After."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class Unauthorized(ServiceError):
    """No bearer token on an admin route, or no API key on a forecast route (401)."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """A wrong admin token or admin disabled, or an unknown API key (403)."""

    code = "forbidden"


class ShuttingDown(ServiceError):
    """The replica is draining; the client should retry elsewhere (503)."""

    code = "shutting_down"


class StorageFull(ServiceError):
    """The registry's filesystem is out of space; the change was rolled back (507)."""

    code = "storage_full"


class Conflict(ServiceError):
    """The registry refused a change (e.g. promoting a version that fails verification) (409)."""

    code = "conflict"
