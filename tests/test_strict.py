"""The integration tests' guard: strict by default, skipping only on an explicit opt-out."""

from __future__ import annotations

import pytest

from tests.strict import LENIENT_ENV, missing, require_module


@pytest.mark.parametrize(
    ("env", "lenient"),
    [
        ({}, False),
        ({LENIENT_ENV: "1"}, True),
        ({LENIENT_ENV: "0"}, False),
        ({LENIENT_ENV: "1", "CI": "true"}, False),  # CI never skips
    ],
)
def test_a_missing_dependency_fails_unless_opted_out(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], lenient: bool
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(LENIENT_ENV, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    expected = pytest.skip.Exception if lenient else pytest.fail.Exception
    with pytest.raises(expected) as info:
        missing("prometheus", "prometheus is not installed")
    assert "apt-get install prometheus" in str(info.value)  # says how to install it


def test_require_module_fails_on_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(LENIENT_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no_such_module_xyz"):
        require_module("no_such_module_xyz")
    assert require_module("json").dumps([1]) == "[1]"
