"""The harness's own judgement, on crafted outcomes and loopback sockets (fast, no service).

One test per way issue 14 found the harness passing with failures: a truncated 200 in the
overload, an overload attempt thrown away, a 500 or a reset before SIGTERM, a request lost after
it was written counted as a clean disconnect, 503s and refused connections counted as successes,
`passed` reading only `problems`. Each builds the outcomes a run would have recorded and feeds
them through the same functions the scenarios use.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bench.reliability import passed
from tests.reliability import scenarios
from tests.reliability.harness import (
    Answer,
    Load,
    Outcome,
    Request,
    free_port,
    parse_forecast,
    summarise,
)

T = 100.0  # a scenario's clock: crafted outcomes are placed around it


def served(sent: float, ms: float = 20.0, version: int = 1) -> Outcome:
    """A whole forecast answer, as `parse_forecast` leaves it."""
    o = Outcome("forecast", sent, sent + ms / 1000, 200, version=version, values=[[[1.0]]])
    o.written = True
    return o


def status(sent: float, code: int, retry_after: str | None = None, ms: float = 20.0) -> Outcome:
    o = Outcome("forecast", sent, sent + ms / 1000, code, retry_after=retry_after)
    o.written = True
    return o


def error(sent: float, kind: str, written: bool, status_code: int | None = None,
          ms: float = 20.0) -> Outcome:
    o = Outcome("forecast", sent, sent + ms / 1000, status_code, error=kind)
    o.written = written
    return o


# -- overload ----------------------------------------------------------------------------------


def overload_run(attempts: list[scenarios.Attempt], capacity: list[Outcome] | None = None,
                 recovery: list[Outcome] | None = None) -> dict[str, object]:
    work = scenarios.workload("inference")
    capacity = capacity if capacity is not None else [served(T - 10 + i / 10) for i in range(50)]
    recovery = recovery if recovery is not None else [served(T + 50 + i) for i in range(5)]
    return scenarios.overload_record(scenarios.OverloadRun(
        "inference", work, capacity_s=5.0, overload_s=4.0, capacity_outcomes=capacity,
        attempts=attempts, recovery_rate=2.5, recovery=recovery, rss_before=100.0,
        rss_after=101.0, rss_peak=101.0, rss_during=[100.0, 101.0], metrics_text=""))


def attempt(outcomes: list[Outcome], rate: float = 40.0, factor: float = 4.0
            ) -> scenarios.Attempt:
    return scenarios.Attempt(rate, factor, outcomes, 0, T, T + 4)


def shedding(n200: int = 20, n503: int = 30, start: float = T) -> list[Outcome]:
    return ([served(start + i / 100) for i in range(n200)]
            + [status(start + i / 100, 503, "1", ms=2) for i in range(n503)])


def test_overload_counts_a_truncated_200_as_failed_and_lists_it_as_a_problem() -> None:
    cut = error(T + 1, "truncated", written=True, status_code=200)
    record = overload_run([attempt([*shedding(), cut])])
    assert record["failed"] == 1
    assert record["problems"], "a truncated answer must be a problem"
    assert not passed(record)


def test_overload_keeps_the_outcomes_of_an_attempt_that_found_no_overload() -> None:
    first = [*(served(T + i / 10) for i in range(30)), status(T + 3.1, 500),
             error(T + 3.2, "timeout", written=True, ms=9000)]
    second = shedding(start=T + 20)
    offered: list[float] = []

    def send(rate: float, factor: float) -> scenarios.Attempt:
        offered.append(rate)
        return attempt(first if len(offered) == 1 else second, rate, factor)

    attempts = scenarios.overload_attempts(send, 40.0, 4.0)
    assert offered == [40.0, 80.0] and len(attempts) == 2
    record = overload_run(attempts)
    assert record["failed"] == 2 and record["problems"]
    reports = record["attempts"]
    assert isinstance(reports, list) and len(reports) == 2
    assert reports[0]["reached_overload"] is False and reports[0]["failed"] == 2
    assert reports[1]["reached_overload"] is True and reports[1]["refused_503"] == 30


def test_overload_counts_503_as_refused_not_answered_and_429_or_no_retry_after_as_failed(
) -> None:
    record = overload_run([attempt([*shedding(20, 30), status(T + 2, 429, "1"),
                                    status(T + 2.1, 503)])])
    over = record["attempts"][0]  # type: ignore[index]
    assert (over["answered"], over["refused_503"], over["failed"]) == (20, 30, 2)
    assert record["failed"] == 2 and record["problems"]


def test_overload_counts_failures_while_measuring_capacity_and_recovering() -> None:
    record = overload_run([attempt(shedding())],
                          capacity=[*(served(T - 10 + i / 10) for i in range(50)),
                                    status(T - 5, 500)],
                          recovery=[served(T + 50), error(T + 51, "lost", written=True)])
    assert record["failed"] == 2 and record["problems"]
    assert record["requests"] == 51 + 50 + 2


def test_a_clean_overload_passes_with_separate_counts() -> None:
    record = overload_run([attempt(shedding(20, 30))])
    assert record["problems"] == [] and passed(record)
    assert (record["answered"], record["refused_503"], record["refused_connect"],
            record["failed"]) == (50 + 20 + 5, 30, 0, 0)


# -- graceful shutdown -------------------------------------------------------------------------


def shutdown(outcomes: list[Outcome]) -> dict[str, object]:
    return scenarios.shutdown_record(outcomes, t_term=T, t_exit=T + 0.5, code=0, workers=1,
                                     rss_before=100.0, rss_loaded=101.0)


def draining(extra: list[Outcome]) -> list[Outcome]:
    """Served before the signal, one in flight across it, refused after: a clean shutdown."""
    return [*(served(T - 2 + i / 10) for i in range(10)), served(T - 0.2, ms=400),
            status(T + 0.1, 503, "1", ms=2), error(T + 0.6, "refused", written=False, ms=1),
            *extra]


def test_shutdown_lists_a_500_before_sigterm_as_a_problem() -> None:
    record = shutdown(draining([status(T - 1.5, 500)]))
    assert record["failed"] == 1 and record["problems"]


def test_shutdown_lists_a_reset_before_sigterm_as_a_problem() -> None:
    record = shutdown(draining([error(T - 1.5, "lost", written=True)]))
    assert record["failed"] == 1 and record["problems"]


def test_shutdown_counts_a_request_written_just_before_sigterm_and_dropped_as_lost() -> None:
    # Sent inside the race window before the signal, its connection closed with no answer.
    record = shutdown(draining([error(T - 0.02, "lost", written=True, ms=40)]))
    assert record["failed"] == 1 and record["problems"]


def test_shutdown_counts_refusals_separately_from_answers() -> None:
    record = shutdown(draining([error(T + 0.7 + i / 100, "refused", written=False, ms=1)
                                for i in range(40)]))
    assert record["problems"] == []
    assert (record["answered"], record["refused_503"], record["refused_connect"],
            record["failed"]) == (11, 1, 41, 0)


# -- the wire: a disconnect is clean only when the request was never written -------------------


@contextmanager
def loopback(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on 127.0.0.1 running `handle` on each accepted connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


OK_BODY = b'{"model": "m", "version": 1, "forecasts": [{"id": "s", "values": [[7.0]]}]}'
OK = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
      + str(len(OK_BODY)).encode() + b"\r\n\r\n" + OK_BODY)


def one_request(_: int) -> Request:
    return Request("POST", "/v1/forecast", b"{}", {"content-type": "application/json"})


def test_a_connection_closed_after_the_request_was_written_is_a_lost_request() -> None:
    def read_then_close(conn: socket.socket) -> None:
        read_request(conn)  # the service read it, then went away without an answer

    with loopback(read_then_close) as url:
        outcomes = Load(url, one_request, workers=1, timeout=5).run_for(0.3)
    assert outcomes and all(o.error == "lost" and o.written for o in outcomes), outcomes[:3]
    # The same outcomes, placed after the signal (a scenario's clock):
    moved = [Outcome(o.tag, T + 0.1 + i / 1000, T + 0.101 + i / 1000, o.status, o.error,
                     written=o.written) for i, o in enumerate(outcomes)]
    record = shutdown(draining(moved))
    assert record["failed"] == len(moved) and record["problems"]


def test_a_keep_alive_connection_closed_before_the_next_request_is_never_written_to() -> None:
    def answer_once_then_close(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(OK)  # keep-alive by default in HTTP/1.1, then closed while idle

    with loopback(answer_once_then_close) as url:
        outcomes = Load(url, one_request, workers=1, think_s=0.1, timeout=5).run_for(0.5)
    assert len(outcomes) >= 3
    assert all(o.status == 200 and o.error is None and o.written for o in outcomes), [
        (o.status, o.error, o.detail) for o in outcomes]


def test_a_refused_connection_is_refused_connect_and_never_written() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    outcomes = Load(url, one_request, workers=1, timeout=5).run_for(0.1)
    assert outcomes and all(o.error == "refused" and not o.written for o in outcomes)


# -- every scenario ----------------------------------------------------------------------------


def test_summaries_list_every_failure_as_a_problem() -> None:
    outcomes = [served(T), status(T, 500), error(T, "timeout", written=True),
                error(T, "truncated", written=True, status_code=200), status(T, 503, "1"),
                error(T, "refused", written=False)]
    record = summarise("any", outcomes, problems=[])
    assert (record["answered"], record["refused_503"], record["refused_connect"],
            record["failed"]) == (1, 0, 0, 5)  # 503s and refusals are failures unless allowed
    assert record["problems"] and not passed(record)


def test_a_200_whose_body_is_not_a_forecast_is_invalid() -> None:
    for body in (b'{"detail": "ok"}', b'{"version": 1, "forecasts": []}', b"[]", b"not json"):
        o = Outcome("forecast", T, T + 0.01)
        parse_forecast(o, Answer(200, {}, body))
        assert o.error is not None, body


def test_bench_passed_reads_failures_too() -> None:
    assert not passed({"scenario": "x", "problems": [], "failed": 1})
    assert passed({"scenario": "x", "problems": [], "failed": 0})
