"""Forecast timestamps: infer the step from the input's `timestamps`, or take `start` + `freq`.

Fixed steps ('15min', 'h', 'D', 'W', ...) are timedeltas. Calendar steps, whose length varies,
follow pandas' offset aliases: month, quarter and year starts and ends (`MS`, `ME`/`M`, `QS`,
`QE`/`Q`, `YS`/`AS`, `YE`/`Y`/`A`, with `-JAN`... anchors for quarters and years), business days
(`B`, numpy's busday arithmetic) and anchored weeks (`W-MON`..`W-SUN`), with a multiplier
(`2MS`, `3B`). Month arithmetic is dateutil's `relativedelta` (day 31 clamps to the month's
last day), so the service needs neither pandas nor hand-written calendars.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
from dateutil.relativedelta import relativedelta

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

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
_CALENDAR = re.compile(
    r"^\s*(\d+)?\s*(MS|ME|M|QS|QE|Q|YS|YE|Y|AS|A|B|W)(?:-([A-Z]{3}))?\s*$"
)
SUPPORTED = (
    "fixed: '30s', '15min' (or 'T'), 'h', 'D', 'W'; calendar: 'MS', 'ME' (or 'M'), 'QS', "
    "'QE' (or 'Q'), 'YS', 'YE' (or 'Y'), quarter/year anchors like 'QS-FEB' or 'YE-JUN', "
    "'B' (business days), 'W-MON'..'W-SUN'; any of them with a multiplier, e.g. '2MS'"
)


@dataclass(frozen=True, slots=True)
class CalendarStep:
    """A step of varying length. `kind`: "month" (every `months` months, on the first or last
    day, in months congruent to `anchor`), "bday" (business days) or "week" (on `weekday`)."""

    alias: str
    kind: str
    n: int
    months: int = 1
    end: bool = False
    anchor: int = 0
    """Month kinds: the step lands on months m with (m - 1) % months == anchor % months."""
    weekday: int = 0

    def on_offset(self, when: datetime) -> bool:
        if self.kind == "month":
            if (when.month - 1) % self.months != self.anchor % self.months:
                return False
            last_day = (when + relativedelta(day=31)).day
            return when.day == (last_day if self.end else 1)
        if self.kind == "bday":
            return when.weekday() < 5
        return when.weekday() == self.weekday

    def shift(self, when: datetime, k: int) -> datetime:
        """`when` moved by `k` steps (`when` on the offset)."""
        if self.kind == "month":
            shifted: datetime = when + relativedelta(
                months=self.months * self.n * k, day=31 if self.end else 1
            )
            return shifted
        if self.kind == "bday":
            day = np.busday_offset(np.datetime64(when.date(), "D"), self.n * k, roll="forward")
            moved: date = day.astype(date)
            return datetime.combine(moved, when.timetz())
        return when + timedelta(weeks=self.n * k)

    def describe(self) -> str:
        return {"month": "month", "bday": "business day", "week": "week"}[self.kind]


Step = timedelta | CalendarStep


def _calendar(freq: str) -> CalendarStep | None:
    m = _CALENDAR.match(freq)
    if m is None:
        return None
    count, base, suffix = m.group(1), m.group(2), m.group(3)
    n = int(count or 1)
    if n < 1 or n > 10_000:
        return None
    if base == "W":
        if suffix not in _DAYS:
            return None  # plain 'W' is the fixed 7-day step
        return CalendarStep(freq, "week", n, weekday=_DAYS.index(suffix))
    if base == "B":
        return None if suffix else CalendarStep(freq, "bday", n)
    end = base in ("ME", "M", "QE", "Q", "YE", "Y", "A")
    if base in ("MS", "ME", "M"):
        return None if suffix else CalendarStep(freq, "month", n, months=1, end=end)
    months = 3 if base.startswith("Q") else 12
    if suffix is None:
        # pandas' defaults: quarters and years start in January, end in December.
        anchor_month = 12 if end else 1
    elif suffix in _MONTHS:
        anchor_month = _MONTHS.index(suffix) + 1
    else:
        return None
    # The anchor names a month the step lands on: 'QS-JAN' Jan/Apr/Jul/Oct, 'QE-DEC' Mar/.../Dec.
    return CalendarStep(freq, "month", n, months=months, end=end, anchor=anchor_month - 1)


def parse_step(freq: str, field: str) -> Step:
    """A fixed step (timedelta) or a calendar one; 422 naming the supported aliases otherwise."""
    if not isinstance(freq, str) or len(freq) > 40:
        raise InvalidInput(f"unsupported freq; supported: {SUPPORTED}", field=field)
    calendar = _calendar(freq)
    if calendar is not None:
        return calendar
    return parse_freq(freq, field)


def parse_freq(freq: str, field: str) -> timedelta:
    """A fixed step only (calendar aliases: `parse_step`)."""
    m = _FREQ.match(freq)
    if m is None:
        raise InvalidInput(f"unsupported freq {freq!r}; supported: {SUPPORTED}", field=field)
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
    step: timedelta | CalendarStep | float
    sep: str = "T"
    integral: bool = False

    def check(self, h: int, field: str) -> None:
        """Refuse an axis whose next `h` instants cannot be written (past the year 9999, or
        beyond the float range), before any work is done for it."""
        try:
            if isinstance(self.step, CalendarStep):
                assert isinstance(self.last, datetime)
                end: datetime | float | None = self.step.shift(self.last, h)
            else:
                # (mypy ignore on the next line) last/step are float/float here (the calendar and
                # datetime cases are handled above)
                end = self.last + self.step * h  # type: ignore[operator]
        except (OverflowError, ValueError):  # ValueError: year 10000 in a calendar step
            end = None
        if end is None or (isinstance(end, float) and not math.isfinite(end)):
            raise InvalidInput(f"the {h} forecast timestamps overflow the time range",
                               field=field)

    def future(self, h: int) -> list[Stamp]:
        if isinstance(self.step, CalendarStep):
            assert isinstance(self.last, datetime)
            cal, start, sep = self.step, self.last, self.sep
            return [cal.shift(start, i + 1).isoformat(sep=sep) for i in range(h)]
        if isinstance(self.last, datetime):
            assert isinstance(self.step, timedelta)
            last, step, sep = self.last, self.step, self.sep
            return [(last + step * (i + 1)).isoformat(sep=sep) for i in range(h)]
        assert isinstance(self.step, float)
        vals: list[Stamp] = [self.last + self.step * (i + 1) for i in range(h)]
        return [int(v) for v in vals] if self.integral else vals


def from_timestamps(stamps: Sequence[Stamp], n_points: int, field: str,
                    freq: str | None = None, freq_field: str = "freq") -> TimeAxis:
    """`timestamps` must match the values row for row and increase; the step is the last gap,
    or `freq` when given (the way to say "monthly": gaps of 28 to 31 days are no fixed step)."""
    if len(stamps) != n_points:
        raise InvalidInput(
            f"{len(stamps)} timestamps for {n_points} value rows", field=field
        )
    if n_points < 2:
        raise InvalidInput("at least two timestamps are needed to infer the step", field=field)
    if all(isinstance(s, str) for s in stamps):
        # (mypy ignore on the next line) every stamp is a str (checked by the all() above); mypy
        # cannot narrow a Sequence's items
        parsed = [_parse_iso(s, f"{field}[{i}]") for i, s in enumerate(stamps)]  # type: ignore[arg-type]
        for i in range(1, len(parsed)):
            try:
                increasing = parsed[i] > parsed[i - 1]
            except TypeError:  # naive vs aware
                raise InvalidInput("timestamps mix time zones", field=f"{field}[{i}]") from None
            if not increasing:
                raise InvalidInput("timestamps must increase", field=f"{field}[{i}]")
        # (mypy ignore on the next line) stamps[-1] is a str (checked above)
        sep = "T" if "T" in stamps[-1] else " "  # type: ignore[operator]
        if freq is not None:
            step = parse_step(freq, freq_field)
            if isinstance(step, CalendarStep) and not step.on_offset(parsed[-1]):
                raise InvalidInput(f"{stamps[-1]} is not on the {freq!r} calendar",
                                   field=f"{field}[{n_points - 1}]")
            return TimeAxis(parsed[-1], step, sep=sep)
        return TimeAxis(parsed[-1], parsed[-1] - parsed[-2], sep=sep)
    if any(isinstance(s, str) or isinstance(s, bool) for s in stamps):
        raise InvalidInput("timestamps must be all ISO strings or all numbers", field=field)
    if freq is not None and isinstance(parse_step(freq, freq_field), CalendarStep):
        raise InvalidInput(f"calendar freq {freq!r} needs ISO timestamps", field=field)
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
    step = parse_step(freq, freq_field)
    if isinstance(step, CalendarStep):
        if not isinstance(start, str):
            raise InvalidInput(f"calendar freq {freq!r} needs an ISO start date",
                               field=start_field)
        first = _parse_iso(start, start_field)
        if not step.on_offset(first):
            raise InvalidInput(f"start {start} is not on the {freq!r} calendar (a "
                               f"{step.describe()} step)", field=start_field)
        try:
            last = step.shift(first, n_points - 1)
        except (OverflowError, ValueError):
            raise InvalidInput("start + freq overflow the time range", field=start_field) from None
        return TimeAxis(last, step, sep="T" if "T" in start else " ")
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
