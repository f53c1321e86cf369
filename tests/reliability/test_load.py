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
    ok(record)
    codes = record["status_codes"]
    assert set(codes) <= {"200", "503", "429"} and codes.get("503", 0) > 0
    assert record["timeouts"] == 0 and record["answers_over_budget"] == 0
    assert record["rss_peak_mb"] <= record["rss_bound_mb"]
    assert record["recovery"]["ok"] == record["recovery"]["requests"] > 0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path,
                                                                 lengths: Lengths) -> None:
    record = scenarios.graceful_shutdown(tmp_path, lengths)
    ok(record)
    assert record["in_flight_at_sigterm"] > 0
    assert record["in_flight_completed"] == record["in_flight_at_sigterm"]
    assert set(record["after_sigterm"]) <= {"200", "503", "refused", "disconnected"}


def test_overload_of_big_bodies_is_bounded_by_the_in_flight_budget(tmp_path: Path,
                                                                   lengths: Lengths) -> None:
    # The event loop (reading, parsing) saturates before inference: the batcher's queue never
    # fills, so the in-flight byte budget is what keeps latency and memory bounded.
    record = scenarios.overload(tmp_path, lengths, kind="parse")
    ok(record)
    assert set(record["status_codes"]) <= {"200", "503", "429"}
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
