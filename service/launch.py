"""`python -m service.launch [uvicorn options]`: uvicorn's command line, with one change.

With several workers, uvicorn's supervisor binds the listening socket, hands it to the workers
and holds it until every worker has drained and exited. The workers stop accepting at SIGTERM,
but the kernel keeps completing handshakes into the socket's queue, and resets them all when the
supervisor exits: requests written on those connections were lost without an answer. Here the
supervisor shuts the shared socket down as soon as it has signalled every worker, so new
connections are refused (the client knows nothing was sent) while the workers drain. Each worker
has left its accept loop at the signal (`service.app._stop_accepting`), so none of them trips
over the closed socket. One worker: uvicorn runs no supervisor; the worker shuts it down itself.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket

from uvicorn import config as uvicorn_config
from uvicorn.supervisors import Multiprocess

from service.logs import uvicorn_log_config


class RefuseWhenStopping(Multiprocess):
    """uvicorn's supervisor, refusing new connections once it has told the workers to stop."""

    def terminate_all(self) -> None:
        super().terminate_all()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)


def main() -> None:
    # uvicorn's default logging config, replaced in place (its CLI default refers to this dict):
    # JSON lines from the first line on, the supervisor's included (--log-config still wins).
    log_format = os.environ.get("DISTILCAST_LOG_FORMAT", "json").lower()
    level = os.environ.get("DISTILCAST_LOG_LEVEL", "INFO").upper()
    uvicorn_config.LOGGING_CONFIG.clear()
    uvicorn_config.LOGGING_CONFIG.update(uvicorn_log_config(log_format, level))
    # `uvicorn.main` the attribute is the click command; the module is what `run()` reads.
    cli = importlib.import_module("uvicorn.main")
    cli.Multiprocess = RefuseWhenStopping  # type: ignore[attr-defined]
    cli.main()


if __name__ == "__main__":
    main()
