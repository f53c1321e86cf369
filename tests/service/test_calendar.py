"""Calendar frequencies: month/quarter/year starts and ends, business days, anchored weeks.

The service computes them with dateutil and numpy; pandas' offsets (installed with the training
extra, never imported by the service) are the independent reference here.
"""

from __future__ import annotations

import httpx
import pandas as pd
import pytest

from service.core.errors import InvalidInput
from service.core.timeaxis import from_start, from_timestamps
from tests.service.conftest import NAME, window

# (freq, a first observed instant on that calendar, chosen so the forecast crosses a year end)
CASES = [
    ("MS", "2024-09-01"),
    ("2MS", "2024-06-01"),
    ("ME", "2024-08-31"),
    ("QS", "2023-10-01"),
    ("QS-FEB", "2023-11-01"),
    ("QE", "2023-12-31"),
    ("YS", "2019-01-01"),
    ("YE", "2019-12-31"),
    ("B", "2024-12-02"),
    ("3B", "2024-11-29"),
    ("W-MON", "2024-11-04"),
    ("W-SUN", "2024-11-03"),
    ("2W-WED", "2024-10-02"),
]


@pytest.mark.parametrize(("freq", "start"), CASES)
def test_calendar_steps_match_pandas(freq: str, start: str) -> None:
    n, h = 6, 8
    expected = pd.date_range(start, periods=n + h, freq=freq)
    assert expected[0] == pd.Timestamp(start)  # the case starts on its calendar
    axis = from_start(start, freq, n, "start", "freq")
    assert axis.future(h) == [t.isoformat(sep=" ") for t in expected[n:]]
    # The same axis given as timestamps (plus freq, since the gaps vary) gives the same answer.
    stamps = [t.isoformat() for t in expected[:n]]
    axis = from_timestamps(stamps, n, "timestamps", freq, "freq")
    assert axis.future(h) == [t.isoformat() for t in expected[n:]]


def test_year_end_crossings_by_hand() -> None:
    # Written out, so a shared mistake with pandas could not hide.
    assert from_start("2024-11-01", "MS", 2, "s", "f").future(3) == [
        "2025-01-01 00:00:00", "2025-02-01 00:00:00", "2025-03-01 00:00:00"]
    assert from_start("2024-07-01T00:00:00", "QS", 2, "s", "f").future(2) == [
        "2025-01-01T00:00:00", "2025-04-01T00:00:00"]
    # Fri 27 Dec 2024, Mon 30 Dec: then Tue 31 Dec, Wed 1 Jan, Thu 2 Jan (weekdays, no holidays).
    assert from_start("2024-12-27T09:30:00", "B", 2, "s", "f").future(3) == [
        "2024-12-31T09:30:00", "2025-01-01T09:30:00", "2025-01-02T09:30:00"]
    assert from_start("2024-12-23", "W-MON", 2, "s", "f").future(2) == [
        "2025-01-06 00:00:00", "2025-01-13 00:00:00"]
    assert from_start("2023-11-30", "ME", 3, "s", "f").future(2) == [
        "2024-02-29 00:00:00", "2024-03-31 00:00:00"]  # a leap February


@pytest.mark.parametrize(("freq", "start", "field", "words"), [
    ("MS", "2024-01-15", "start", "not on the 'MS' calendar"),
    ("W-MON", "2024-01-02", "start", "not on the 'W-MON' calendar"),
    ("B", "2024-01-06", "start", "not on the 'B' calendar"),  # a Saturday
    ("fortnight", "2024-01-01", "freq", "supported: fixed:"),
    ("QS-XYZ", "2024-01-01", "freq", "'W-MON'..'W-SUN'"),
])
def test_refusals_name_the_field(freq: str, start: str, field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        from_start(start, freq, 4, "start", "freq")
    assert err.value.field == field and words in err.value.message


def test_calendar_needs_dates() -> None:
    with pytest.raises(InvalidInput, match="ISO start date"):
        from_start(0, "MS", 4, "start", "freq")


def test_calendar_axes_over_http(client: httpx.Client) -> None:
    n = len(window())
    months = pd.date_range("2022-01-01", periods=n, freq="MS")
    r = client.post("/v1/forecast", json={"model": NAME, "horizon": 3, "series": [
        {"id": "ms", "values": window(), "start": str(months[0].date()), "freq": "MS"},
        {"id": "qs", "values": window(), "start": "2017-01-01T00:00:00", "freq": "QS"},
        {"id": "b", "values": window(), "start": "2024-11-15", "freq": "B"},
        {"id": "w", "values": window(), "start": "2024-06-03", "freq": "W-MON"},
        {"id": "ts", "values": window(), "freq": "MS",
         "timestamps": [t.strftime("%Y-%m-%d") for t in months]},
    ]})
    assert r.status_code == 200, r.text
    got = {f["id"]: f["timestamps"] for f in r.json()["forecasts"]}
    # 32 month starts from Jan 2022 end in Aug 2024; 32 quarters from 2017 end in Q4 2024.
    assert got["ms"] == ["2024-09-01 00:00:00", "2024-10-01 00:00:00", "2024-11-01 00:00:00"]
    assert got["qs"] == ["2025-01-01T00:00:00", "2025-04-01T00:00:00", "2025-07-01T00:00:00"]
    # 32 business days from Fri 15 Nov 2024 end on Mon 30 Dec; then 31 Dec, 1 and 2 Jan.
    assert got["b"] == ["2024-12-31 00:00:00", "2025-01-01 00:00:00", "2025-01-02 00:00:00"]
    assert got["w"] == ["2025-01-13 00:00:00", "2025-01-20 00:00:00", "2025-01-27 00:00:00"]
    assert got["ts"] == got["ms"]

    r = client.post("/v1/forecast", json={"model": NAME, "series": [
        {"id": "x", "values": window(), "start": "2024-01-01", "freq": "MQ"}]})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "series[0].freq" and "'MS'" in err["message"] and "'B'" in err["message"]
