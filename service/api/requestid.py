"""`X-Request-ID`: taken from the request (or generated), echoed on the response, and stamped on
every log line written while the request is handled (`service.logs.request_id`). The optional
access log is written here too, so it carries the id (uvicorn's own access log could not)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import event, request_id

HEADER = b"x-request-id"
# What a caller may choose: short and printable, so an id can never forge or break a log line.
_ACCEPTED = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")

access_log = logging.getLogger("service.access")

# Generated ids: a random 64-bit prefix per process and a counter, 32 hex digits like a UUID.
# uuid4() costs a getrandom() call per request (~2-10 us here); this costs ~0.3 us.
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):016x}"


class RequestId:
    """Pure ASGI middleware, outermost, so the fast path and every error answer get the id."""

    def __init__(self, app: ASGIApp, *, access: bool = False) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        rid = given.decode() if given is not None and _ACCEPTED.match(given) else new_request_id()
        token = request_id.set(rid)
        encoded = rid.encode()
        status = 500  # what the client sees if the app fails before answering
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (HEADER, encoded)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access:
                access_log.info(
                    "%s %s %d", scope["method"], scope["path"], status,
                    extra=event("access", method=scope["method"], path=scope["path"],
                                status=status,
                                duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
                                client=(scope.get("client") or ("", 0))[0]),
                )
            request_id.reset(token)
