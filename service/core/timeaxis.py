"""Forecast timestamps: infer the step from the input's `timestamps`, or take `start` + `freq`."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.core.errors import InvalidInput

_FREQ = re.compile(r"^\s*(\d+)?\s*(ms|s|S|sec|min|T|h|H|D|d|W|w)\s*$")
_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "S": timedelta(seconds=1),
    "sec": timedelta(seconds=1),
    "min": timedelta(minutes=1),
    "T": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "H": timedelta(hours=1),
    "D": timedelta(days=1),
    "d": timedelta(days=1),
    "W": timedelta(weeks=1),
    "w": timedelta(weeks=1),
}

Stamp = str | int | float


def parse_freq(freq: str, field: str) -> timedelta:
    m = _FREQ.match(freq)
    if m is None:
        raise InvalidInput(
            f"unsupported freq {freq!r} (fixed steps only: e.g. '15min', 'h', 'D', 'W', '30s')",
            field=field,
        )
    try:
        return int(m.group(1) or 1) * _UNITS[m.group(2)]
    except (OverflowError, ValueError):  # beyond timedelta's range (or int's digit limit)
        raise InvalidInput(f"freq {freq[:40]!r} is too large", field=field) from None


def _parse_iso(value: str, field: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"not an ISO 8601 timestamp: {value!r}", field=field) from None


@dataclass(frozen=True, slots=True)
class TimeAxis:
    """The last observed instant and the step; renders the next `h` instants like the input."""

    last: datetime | float
    step: timedelta | float
    sep: str = "T"
    integral: bool = False

    def check(self, h: int, field: str) -> None:
        """Refuse an axis whose next `h` instants cannot be written (past the year 9999, or
        beyond the float range), before any work is done for it."""
        try:
            end = self.last + self.step * h  # type: ignore[operator]
        except OverflowError:
            end = None
        if end is None or (isinstance(end, float) and not math.isfinite(end)):
            raise InvalidInput(f"the {h} forecast timestamps overflow the time range",
                               field=field)

    def future(self, h: int) -> list[Stamp]:
        if isinstance(self.last, datetime):
            assert isinstance(self.step, timedelta)
            last, step, sep = self.last, self.step, self.sep
            return [(last + step * (i + 1)).isoformat(sep=sep) for i in range(h)]
        assert isinstance(self.step, float)
        vals: list[Stamp] = [self.last + self.step * (i + 1) for i in range(h)]
        return [int(v) for v in vals] if self.integral else vals


def from_timestamps(stamps: Sequence[Stamp], n_points: int, field: str) -> TimeAxis:
    """`timestamps` must match the values row for row and increase; the step is the last gap."""
    if len(stamps) != n_points:
        raise InvalidInput(
            f"{len(stamps)} timestamps for {n_points} value rows", field=field
        )
    if n_points < 2:
        raise InvalidInput("at least two timestamps are needed to infer the step", field=field)
    if all(isinstance(s, str) for s in stamps):
        parsed = [_parse_iso(s, f"{field}[{i}]") for i, s in enumerate(stamps)]  # type: ignore[arg-type]
        for i in range(1, len(parsed)):
            try:
                increasing = parsed[i] > parsed[i - 1]
            except TypeError:  # naive vs aware
                raise InvalidInput("timestamps mix time zones", field=f"{field}[{i}]") from None
            if not increasing:
                raise InvalidInput("timestamps must increase", field=f"{field}[{i}]")
        sep = "T" if "T" in stamps[-1] else " "  # type: ignore[operator]
        return TimeAxis(parsed[-1], parsed[-1] - parsed[-2], sep=sep)
    if any(isinstance(s, str) or isinstance(s, bool) for s in stamps):
        raise InvalidInput("timestamps must be all ISO strings or all numbers", field=field)
    nums = [float(s) for s in stamps]
    for i in range(1, len(nums)):
        if not nums[i] > nums[i - 1]:
            raise InvalidInput("timestamps must increase", field=f"{field}[{i}]")
    integral = all(isinstance(s, int) for s in stamps)
    return TimeAxis(nums[-1], nums[-1] - nums[-2], integral=integral)


def from_start(
    start: Stamp, freq: str, n_points: int, start_field: str, freq_field: str
) -> TimeAxis:
    """`start` is the first observed instant; the last is start + (n - 1) * freq."""
    step = parse_freq(freq, freq_field)
    if isinstance(start, str):
        first = _parse_iso(start, start_field)
        sep = "T" if "T" in start else " "
        try:
            last = first + step * (n_points - 1)
        except OverflowError:
            raise InvalidInput("start + freq overflow the time range", field=start_field) from None
        return TimeAxis(last, step, sep=sep)
    seconds = step.total_seconds()
    return TimeAxis(
        float(start) + seconds * (n_points - 1),
        seconds,
        integral=isinstance(start, int) and seconds.is_integer(),
    )
