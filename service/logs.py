"""Logging: JSON lines on stderr for the app and uvicorn, with the request id of each request.

`configure_logging(settings)` runs in `create_app()` (after uvicorn has applied its own config,
so its loggers are taken over here). Every record passes `RequestIdFilter`, which stamps the id of
the request being handled (a context variable set by `service.api.requestid.RequestId`), or
`null` outside a request (start-up, the registry listener, releases after a drain).
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from service.config import Settings

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "distilcast_request_id", default=None
)

_HANDLER_NAME = "distilcast"
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to every record that passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}{request_id}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure_logging(settings: Settings) -> None:
    """Install one stderr handler on the root logger (JSON unless `log_format="text"`), route
    uvicorn's loggers through it, and set the level. Idempotent: a second app in the same
    process replaces the handler rather than adding another; other handlers (pytest's) stay."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
        ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in _UVICORN:
        # uvicorn's dictConfig gave these their own plain-text handlers; send them to ours.
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
    # Our access log (service.api.requestid) carries the request id; uvicorn's would not.
    logging.getLogger("uvicorn.access").disabled = True


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """`extra=` for a structured lifecycle line: `log.info(..., extra=event("swap", ...))`."""
    return {"event": kind, **fields}


def uvicorn_log_config(log_format: str = "json", level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's own start-up (`service.launch` installs it),
    so the supervisor's lines, written before any app exists, are JSON too."""
    formatter: dict[str, Any] = (
        {"()": "service.logs.json_formatter"} if log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "service.logs.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
