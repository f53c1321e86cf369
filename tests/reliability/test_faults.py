"""Faults under load: Redis killed and restarted, promotions, a corrupted artifact promoted, a
frozen Redis, slow clients, a full disk, and two workers through promotions, an outage and a drain.

Each test runs the service as a process (scripts/launch_service.sh) and asserts that the
scenario's record (tests/reliability/scenarios.py) lists no problem; the record is printed on
failure. bench/reliability.py runs the same scenarios at full length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.models_registry.conftest import RedisServer
from tests.reliability import scenarios
from tests.reliability.harness import FileSystemUnavailable, Lengths, Outcome

pytestmark = pytest.mark.slow


def ok(record: dict[str, Any]) -> None:
    """No problem and no failed outcome: every outcome was the scenario's expected answer or,
    where the scenario allows one, a clean refusal (counted apart, never as answered)."""
    dump = json.dumps(record, indent=1, default=str)
    assert record["problems"] == [], dump
    assert record["failed"] == 0, dump
    assert record["requests"] == (record["answered"] + record["refused_503"]
                                  + record["refused_connect"] + record["failed"]), dump


def test_redis_killed_and_restarted_under_load(tmp_path: Path, lengths: Lengths,
                                               redis_server: RedisServer) -> None:
    record = scenarios.redis_outage(tmp_path, lengths, redis_server)
    ok(record)
    assert record["refused_503"] == record["refused_connect"] == 0
    assert record["failed_during_outage"] == 0 and record["requests_during_outage"] > 0
    assert record["promotion_to_swap_s"] < 5.0  # the pub/sub event, not the 10 s resync


def test_promotions_under_load_switch_exactly_at_the_promotions(tmp_path: Path,
                                                                lengths: Lengths) -> None:
    record = scenarios.promotions(tmp_path, lengths)
    ok(record)
    assert record["answered"] == record["requests"] > 0
    assert record["switches"] == lengths.promotions
    assert set(record["versions_seen"]) == {str(v) for v in range(1, lengths.promotions + 2)}


def test_a_corrupted_artifact_is_refused_and_the_old_version_serves(tmp_path: Path,
                                                                    lengths: Lengths) -> None:
    record = scenarios.corrupt_artifact(tmp_path, lengths)
    ok(record)
    assert record["answered"] == record["requests"] > 0
    assert record["api_refusal"]["status"] == 409 and record["api_refusal"]["field"] == "version"
    assert record["loads_integrity_error_total"] >= 2


def test_a_frozen_redis_costs_at_most_its_timeout(tmp_path: Path, lengths: Lengths,
                                                  redis_server: RedisServer) -> None:
    record = scenarios.redis_frozen(tmp_path, lengths, redis_server)
    ok(record)
    assert record["refused_503"] == record["refused_connect"] == 0
    assert record["requests_while_frozen"] > 0 and record["failed_while_frozen"] == 0
    assert record["p99_ms"] <= record["redis_operation_timeout_ms"]
    assert record["promotion_to_swap_s"] < 5.0


def test_slow_clients_are_closed_and_do_not_slow_the_others(tmp_path: Path,
                                                            lengths: Lengths) -> None:
    record = scenarios.slowloris(tmp_path, lengths)
    ok(record)
    assert record["answered"] == record["requests"] > 0
    assert record["p99_ratio"] <= 2.0
    assert record["slow_closed_by_server"] >= record["slow_connections"]


def test_a_full_disk_refuses_cleanly_and_the_old_version_serves(tmp_path: Path,
                                                                lengths: Lengths) -> None:
    try:
        record = scenarios.disk_full(tmp_path, lengths)
    except FileSystemUnavailable as exc:
        pytest.skip(str(exc))
    ok(record)
    assert record["answered"] == record["requests"] > 0
    assert record["api_refusal"]["status"] == 507
    assert "no space left" in (record["register_error"] or "")


def test_two_workers_through_promotions_outage_and_drain(tmp_path: Path, lengths: Lengths,
                                                        redis_server: RedisServer) -> None:
    record = scenarios.two_workers(tmp_path, lengths, redis_server)
    ok(record)
    assert record["metrics_forecasts_counted"] == record["forecasts_answered"] > 0
    assert record["metrics_worker_pids"] == 2 and record["exit_status"] == 0


def test_promotion_lag_is_the_last_old_answer_after_the_put() -> None:
    windows = [(10.0, 10.1, 2), (20.0, 20.1, 3)]
    outcomes = [_o(9.0, 9.1, 1), _o(10.3, 10.4, 1), _o(10.5, 10.6, 2), _o(20.2, 20.3, 3)]
    assert scenarios.promotion_lag(outcomes, windows) == {"2": 0.2, "3": 0.0}


def _o(sent: float, done: float, version: int) -> Outcome:
    return Outcome("forecast", sent, done, 200, version=version)


def test_the_switch_point_check_catches_a_late_or_early_switch() -> None:
    windows = [(10.0, 10.1, 2)]
    good = [_o(9.0, 9.5, 1), _o(9.9, 10.2, 1), _o(10.05, 10.3, 2), _o(11.0, 11.1, 2)]
    check = scenarios.check_switch_points(good, windows)
    assert check["outside_window"] == 0 and check["switches"] == 1
    late = [*good, _o(11.2, 11.3, 1)]  # v1 answered after the promotion had returned
    check = scenarios.check_switch_points(late, windows)
    assert check["outside_window"] == 1 and check["regressions"] == 1
    early = [_o(9.0, 9.5, 2), *good]  # v2 before anyone promoted it
    assert scenarios.check_switch_points(early, windows)["outside_window"] == 1
