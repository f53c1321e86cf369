"""Hostile input against the service process: hand-written cases, schemathesis over the OpenAPI
schema, and a fuzz of the numeric core. In CI: `SHORT.fuzz_examples` (40) cases per operation and
generation mode, about 400 schemathesis cases in all; bench/reliability.py runs 150 (> 1000)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.reliability import hostile, scenarios
from tests.reliability.harness import Lengths, ServiceProcess


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("hostile")
    scenarios.family(workdir / "registry")
    with ServiceProcess(workdir, workdir / "registry", **scenarios.HOSTILE_SETTINGS) as svc:
        yield svc


@pytest.mark.parametrize("case", hostile.CASES, ids=[c.name for c in hostile.CASES])
def test_hand_written_hostile_request(service: ServiceProcess, case: hostile.Case) -> None:
    (result,) = hostile.run_cases(service.url, [case])
    assert result.problem is None, result.problem


def test_schemathesis_finds_no_server_error(service: ServiceProcess, lengths: Lengths) -> None:
    report = hostile.schemathesis_fuzz(service.url, lengths.fuzz_examples)
    assert not report.server_errors, report.server_errors[:5]
    assert not report.not_our_error_shape, report.not_our_error_shape[:5]
    operations = {label.split(" positive")[0].split(" negative")[0]
                  for label in report.by_operation}
    schema = httpx.get(f"{service.url}/openapi.json", timeout=10).json()
    every = {f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method in ops}
    assert operations == every  # every route of the schema was exercised
    assert report.cases >= len(every) * lengths.fuzz_examples


def test_numeric_core_fuzz_finds_no_server_error(service: ServiceProcess,
                                                 lengths: Lengths) -> None:
    report = hostile.core_fuzz(service.url, lengths.fuzz_examples * 4)
    assert not report.server_errors, report.server_errors[:5]
    assert not report.bad_answers, report.bad_answers
    assert report.status_codes[200] > 0  # the fuzz reaches the models, not only validation


def test_no_traceback_in_the_service_log(service: ServiceProcess) -> None:
    # Runs last in this module: every case above has been answered by now.
    assert "Traceback" not in service.log(), service.log()[-3000:]
