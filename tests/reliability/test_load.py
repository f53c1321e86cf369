"""Overload at about 4x measured capacity, and graceful shutdown (SIGTERM) under load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import scenarios
from tests.reliability.harness import Lengths
from tests.reliability.test_faults import ok

pytestmark = pytest.mark.slow


def test_overload_sheds_with_retry_after_and_recovers(tmp_path: Path, lengths: Lengths) -> None:
    record = scenarios.overload(tmp_path, lengths)
    ok(record)  # failed == 0: only 200s (whole forecasts) and 503s with Retry-After
    assert set(record["status_codes"]) <= {"200", "503"}
    assert record["refused_503"] > 0 and record["refused_connect"] == 0
    assert record["attempts"][-1]["reached_overload"]
    assert all(a["failed"] == 0 for a in record["attempts"]) and record["capacity"]["failed"] == 0
    assert record["timeouts"] == 0 and record["answers_over_budget"] == 0
    assert record["rss_peak_mb"] <= record["rss_bound_mb"]
    assert record["recovery"]["answered"] == record["recovery"]["requests"] > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path, lengths: Lengths,
                                                                 workers: int) -> None:
    # Two workers: uvicorn's supervisor holds the listening socket while the workers drain;
    # service/launch.py shuts it down so that nothing connects into a queue nobody accepts.
    record = scenarios.graceful_shutdown(tmp_path, lengths, workers=workers)
    ok(record)  # failed == 0: nothing lost, cut short or hanging, before or after the signal
    assert record["in_flight_at_sigterm"] > 0
    assert record["in_flight_completed"] == record["in_flight_at_sigterm"]
    assert record["before_sigterm"]["answered"] == record["before_sigterm"]["requests"]
    assert set(record["after_sigterm_codes"]) <= {"200", "503", "refused", "unsent"}


def test_overload_of_big_bodies_is_bounded_by_the_in_flight_budget(tmp_path: Path,
                                                                   lengths: Lengths) -> None:
    # The event loop (reading, parsing) saturates before inference: the batcher's queue never
    # fills, so the in-flight byte budget is what keeps latency and memory bounded.
    record = scenarios.overload(tmp_path, lengths, kind="parse")
    ok(record)  # failed == 0: only whole 200s and 503s with Retry-After
    assert set(record["status_codes"]) <= {"200", "503"} and record["refused_503"] > 0
    assert record["timeouts"] == 0 and record["answers_over_budget"] == 0
    assert record["rss_peak_mb"] <= record["rss_bound_mb"]


def test_while_draining_every_answer_closes_its_connection(tmp_path: Path) -> None:
    # In process: the SIGTERM hook marks the replica draining; what it changes on the wire.
    from tests.service.conftest import serving

    scenarios.family(tmp_path / "registry")
    with serving(registry_root=tmp_path / "registry") as s, s.client() as c:
        assert "close" not in c.get("/healthz").headers.get("connection", "")
        s.services.draining = True
        r = c.post("/v1/forecast", content=scenarios.forecast_body(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.headers["connection"] == "close" and r.json()["error"]["code"] == "shutting_down"
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["connection"] == "close"
        s.services.draining = False


def test_an_answer_started_while_draining_closes_its_connection_though_its_request_did_not(
) -> None:
    # A request in flight at SIGTERM is answered while draining: without `Connection: close`
    # the client would reuse the connection just as uvicorn closes it as idle.
    import asyncio

    from service.api.limits import CloseWhenDraining

    state = {"draining": False}
    sent: list[dict[str, object]] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        state["draining"] = True  # the signal arrives while the request is being computed
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    async def record(message: dict[str, object]) -> None:
        sent.append(message)

    guard = CloseWhenDraining(app, draining=lambda: state["draining"])  # type: ignore[arg-type]
    asyncio.run(guard({"type": "http"}, None, record))  # type: ignore[arg-type]
    assert sent[0]["headers"] == [(b"connection", b"close")]


def test_the_supervisor_refuses_new_connections_once_it_has_stopped_the_workers() -> None:
    import socket

    from service.launch import RefuseWhenStopping

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    supervisor = object.__new__(RefuseWhenStopping)  # no __init__: it would take our signals
    supervisor.processes, supervisor.sockets = [], [listener]
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # accepted by the kernel: the socket listens
    supervisor.terminate_all()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    listener.close()
