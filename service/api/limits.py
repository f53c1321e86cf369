"""ASGI guards: a body size limit for the routes FastAPI reads itself (the forecast routes
enforce theirs), and `Connection: close` on every answer while the replica drains.

FastAPI reads and parses a route's whole body before the endpoint runs, so without this an
unauthenticated client could make the admin route buffer and parse any number of bytes before
`check_admin` refuses it. Those routes take at most a few bytes of JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.core.errors import LimitExceeded

SMALL_BODY_BYTES = 64 * 1024


class BodyLimit:
    """Answer 413 to a body above `limit` bytes on every HTTP route except `skip`."""

    def __init__(self, app: ASGIApp, *, limit: int = SMALL_BODY_BYTES,
                 skip: Collection[str] = ()) -> None:
        self.app = app
        self.limit = limit
        self.skip = frozenset(skip)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await self._refuse(scope, receive, send, value.decode("latin-1"))
                    return
                break
        # Read the (small) body here, counting; the route then reads it from memory.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, f"more than {self.limit}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        error = LimitExceeded(f"body of {size} bytes; this route takes at most {self.limit}",
                              field="body")
        response = error_response(error)
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


class CloseWhenDraining:
    """While the replica drains, every answer says `Connection: close`.

    uvicorn stops accepting on SIGTERM and waits (up to its graceful timeout) for open
    connections to close, but a connection accepted in the same loop turn as the signal misses
    its shutdown notice and would stay keep-alive, served until the timeout cancels whatever it
    runs then (a 500). Closing after each answer ends such connections at their next request.

    Decided when the answer starts, not when the request arrived: a request in flight at the
    signal is answered while draining too, and without the header its connection would look
    reusable to the client just as uvicorn closes it as idle, losing the next request written
    on it.
    """

    def __init__(self, app: ASGIApp, *, draining: Callable[[], bool]) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining():
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)
