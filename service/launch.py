"""`python -m service.launch [uvicorn options]`: uvicorn's command line, with one change.

With several workers, uvicorn's supervisor binds the listening socket, hands it to the workers
and holds it until every worker has drained and exited. The workers stop accepting at SIGTERM,
but the kernel keeps completing handshakes into the socket's queue, and resets them all when the
supervisor exits: requests written on those connections were lost without an answer. Here the
supervisor shuts the shared socket down as soon as it has signalled every worker, so new
connections are refused (the client knows nothing was sent) while the workers drain. Each worker
has left its accept loop at the signal (`service.app._stop_accepting`), so none of them trips
over the closed socket. One worker: uvicorn runs no supervisor; the worker shuts it down itself.

More changes, for any worker count:

* slow clients: uvicorn closes an idle keep-alive connection after `--timeout-keep-alive`, but
  never one that is still sending its request head (a connection that sends nothing, or one byte
  a second, holds a socket for ever: slowloris). `HeadTimeoutH11Protocol` closes a connection
  whose request head (request line and headers) is not complete `DISTILCAST_HEAD_TIMEOUT_S`
  seconds (default 10) after the connection opened or after the first byte of a later request
  on it; bodies and answers are not limited by it.
* TCP_NODELAY on every connection (`nodelay`): in a worker, asyncio left it off.
* connections spread over the workers: every worker waits on the one shared listening socket
  and asyncio accepts up to `backlog` (2048) pending connections each time it wakes, so the
  first worker to wake took a whole burst (16 connections opened at once: 14 on one worker, 2
  on the other, and the second core idled). `accept_one_per_wakeup` makes each worker accept one
  connection per event-loop pass: a busy worker comes back later, so the idle one takes more.
  The kernel's listen queue keeps its length (the patched argument only bounds asyncio's
  accept loop).
* metrics: the supervisor marks every worker that exits (or dies and is replaced) dead for
  prometheus-client's multiprocess mode, so its live gauges drop out of `/metrics`.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import contextlib
import importlib
import os
import socket
import sys
from typing import Any

import h11
from prometheus_client import multiprocess
from uvicorn import config as uvicorn_config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from service.logs import uvicorn_log_config

HEAD_TIMEOUT_ENV = "DISTILCAST_HEAD_TIMEOUT_S"
# The protocol class as uvicorn's --http takes it: an import string (a spawned worker imports it).
HTTP_PROTOCOL = "service.launch:HeadTimeoutH11Protocol"


def accept_one_per_wakeup() -> None:
    """Patch asyncio's selector loop so a listening socket's reader accepts one connection per
    wake-up (see the module docstring). Applied when this module is imported: in a worker that
    is when uvicorn resolves `--http`, before it starts serving."""
    cls: Any = asyncio.selector_events.BaseSelectorEventLoop  # a private method: untyped
    original = cls._start_serving
    if getattr(original, "_one_per_wakeup", False):
        return

    def start_serving(self: Any, protocol_factory: Any, sock: Any, sslcontext: Any = None,
                      server: Any = None, backlog: int = 100, *args: Any, **kwargs: Any) -> Any:
        return original(self, protocol_factory, sock, sslcontext, server, 1, *args, **kwargs)

    # (mypy ignore on the next line) marks the patched function so the patch applies once (functions
    # take attributes; mypy's type has none)
    start_serving._one_per_wakeup = True  # type: ignore[attr-defined]
    cls._start_serving = start_serving


accept_one_per_wakeup()


def head_timeout_s() -> float:
    value = float(os.environ.get(HEAD_TIMEOUT_ENV, "10"))
    if not value > 0:
        raise ValueError(f"{HEAD_TIMEOUT_ENV} must be > 0 seconds, got {value}")
    return value


def nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on an accepted connection. asyncio sets it only when the socket says
    `proto == IPPROTO_TCP`; with several workers uvicorn's supervisor binds
    `socket.socket(AF_INET)` (proto 0) and the workers serve it, so their connections kept
    Nagle's algorithm: an
    answer's body (written after its headers) waited for the client's delayed ACK (at least
    40 ms on Linux) on every request."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head arrives too slowly."""

    head_timeout: float | None = None
    _head_timer: asyncio.TimerHandle | None = None

    # (mypy ignore on the next line) h11's protocol types the transport as BaseTransport; asyncio
    # gives the Transport we need
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        nodelay(transport)
        super().connection_made(transport)
        if HeadTimeoutH11Protocol.head_timeout is None:
            HeadTimeoutH11Protocol.head_timeout = head_timeout_s()
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Bytes of a request head, not complete yet: from its first byte the clock runs.
            if self._head_timer is None and not self.transport.is_closing():
                self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        assert self.head_timeout is not None
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # an answer is on its way (pipelining): the keep-alive rules apply after it
        self.logger.debug("closing a connection whose request head took over %s s",
                          self.head_timeout)
        self.transport.close()


class RefuseWhenStopping(Multiprocess):
    """uvicorn's supervisor, refusing new connections once it has told the workers to stop."""

    def terminate_all(self) -> None:
        super().terminate_all()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def keep_subprocess_alive(self) -> None:
        before = {p.pid for p in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {p.pid for p in self.processes}:
            if pid is not None:
                _mark_dead(pid)  # died and replaced: its live gauges go

    def join_all(self) -> None:
        super().join_all()
        for process in self.processes:
            if process.pid is not None:
                _mark_dead(process.pid)


def _mark_dead(pid: int) -> None:
    # prometheus_client.multiprocess directly, not service.metrics: importing the metric
    # declarations here would give the supervisor live gauge files of its own.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def main() -> None:
    # uvicorn's default logging config, replaced in place (its CLI default refers to this dict):
    # JSON lines from the first line on, the supervisor's included (--log-config still wins).
    log_format = os.environ.get("DISTILCAST_LOG_FORMAT", "json").lower()
    level = os.environ.get("DISTILCAST_LOG_LEVEL", "INFO").upper()
    uvicorn_config.LOGGING_CONFIG.clear()
    uvicorn_config.LOGGING_CONFIG.update(uvicorn_log_config(log_format, level))
    # `uvicorn.main` the attribute is the click command; the module is what `run()` reads.
    # --http's choices are fixed when uvicorn.main is imported: the import string is added as
    # a choice of its own, so a spawned worker (which never imports this module first) resolves
    # it with import_from_string.
    uvicorn_config.HTTP_PROTOCOLS[HTTP_PROTOCOL] = HTTP_PROTOCOL
    if not any(a == "--http" or a.startswith("--http=") for a in sys.argv[1:]):
        head_timeout_s()  # a bad value fails here, before any worker starts
        sys.argv[1:1] = ["--http", HTTP_PROTOCOL]
    cli = importlib.import_module("uvicorn.main")
    # (mypy ignore on the next line) uvicorn.main re-exports Multiprocess untyped; swapped for the
    # drain-aware supervisor
    cli.Multiprocess = RefuseWhenStopping  # type: ignore[attr-defined]
    cli.main()


if __name__ == "__main__":
    main()
