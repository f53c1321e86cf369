"""Fixtures for the reliability suite: the scenario lengths, a private redis-server.

`DISTILCAST_RELIABILITY_LENGTH=full` runs the tests at the benchmark's full length; CI runs them
short (tests/reliability/harness.py `SHORT`).
"""

from __future__ import annotations

import os

import pytest

from tests.models_registry.conftest import redis_server  # noqa: F401  # a fixture, re-exported
from tests.reliability.harness import FULL, SHORT, Lengths


@pytest.fixture(scope="session")
def lengths() -> Lengths:
    return FULL if os.environ.get("DISTILCAST_RELIABILITY_LENGTH") == "full" else SHORT
