"""JSON value arrays -> float32 windows, with errors that name the offending element."""

from __future__ import annotations

import math
import reprlib
from itertools import chain
from typing import Any

import msgspec
import numpy as np

from service.core.errors import InvalidInput

_F32_MAX = float(np.finfo(np.float32).max)
# Echo at most a few elements / levels of a bad value back (a hostile row may be huge or nested
# a thousand deep: repr() would be megabytes, or fail with RecursionError).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 6, 40, 40
# numpy converts "1" and true to 1.0; msgspec's strict float takes int and float only. Checking
# the nesting with msgspec costs about 8 ns per value, a fraction of the conversion itself.
_ROWS = list[list[float]]
_FLAT = list[float]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _bad_number(v: Any, where: str) -> InvalidInput:
    if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity"):  # literals (decode.py)
        return InvalidInput(f"value must be finite, got {v}", field=where)
    if _is_number(v):
        if isinstance(v, float) and not math.isfinite(v):
            return InvalidInput(f"value must be finite, got {v}", field=where)
        return InvalidInput(f"value {_REPR.repr(v)} is outside the float32 range", field=where)
    return InvalidInput(f"value must be a finite number, got {_REPR.repr(v)}", field=where)


def _bad(v: Any) -> bool:
    """Not a finite number within float32 range (ints compare exactly, so no overflow here)."""
    if not _is_number(v):
        return True
    if isinstance(v, float) and not math.isfinite(v):
        return True
    return bool(abs(v) > _F32_MAX)


def _item(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _locate(values: list[Any], field: str) -> InvalidInput:
    """Slow path after numpy refused the array: find the first bad row or element."""
    first = values[0]
    if isinstance(first, list):
        width = len(first)
        if width == 0:
            return InvalidInput("rows must not be empty", field=f"{field}[0]")
        for i, row in enumerate(values):
            if not isinstance(row, list):
                return InvalidInput("expected a row (array of numbers)", field=f"{field}[{i}]")
            if len(row) != width:
                return InvalidInput(
                    f"ragged rows: row has {len(row)} values, row 0 has {width}",
                    field=f"{field}[{i}]",
                )
            for j, v in enumerate(row):
                if _bad(v):
                    return _bad_number(v, f"{field}[{i}][{j}]")
    else:
        for i, v in enumerate(values):
            if isinstance(v, list):
                return InvalidInput("mixes numbers and rows", field=f"{field}[{i}]")
            if _bad(v):
                return _bad_number(v, f"{field}[{i}]")
    return InvalidInput("values must be numbers: [..] or rows [[..], ..]", field=field)


def to_window(values: Any, field: str) -> tuple[np.ndarray, bool]:
    """`[v, ...]` (univariate) or `[[v, ...], ...]` (rows of channels) -> float32 [n, C].

    Numbers only: strings and booleans are refused (numpy alone would read "1" and true as
    1.0). np.fromiter over the flattened rows is about twice as fast as np.array on nested lists;
    anything refused (or turned into NaN, like null) is located by the slow path.
    """
    if not isinstance(values, list) or not values:
        raise InvalidInput("values must be a non-empty array", field=field)
    n = len(values)
    first = values[0]
    try:
        if isinstance(first, list):
            width = len(first)
            if width == 0 or set(map(len, values)) != {width}:
                raise _locate(values, field)
            msgspec.convert(values, _ROWS)
            flat = np.fromiter(chain.from_iterable(values), np.float64, n * width)
            univariate = False
        else:
            width = 1
            msgspec.convert(values, _FLAT)
            flat = np.fromiter(values, np.float64, n)
            univariate = True
    except (msgspec.ValidationError, TypeError, ValueError, OverflowError):
        # a row that is not a list, a nested list, a string or boolean, an int beyond float64
        raise _locate(values, field) from None
    with np.errstate(over="ignore", invalid="ignore"):
        out = flat.astype(np.float32).reshape(n, width)
    if not np.isfinite(out).all():
        raise _locate(values, field)
    return out, univariate


def flat_to_windows(
    values: Any, sizes: list[int], n_channels: int, field: str
) -> tuple[np.ndarray, list[InvalidInput | None]]:
    """Columnar form: flat values (time-major, channels innermost) cut by `sizes` rows each.

    Returns the float32 [total_rows, C] array and, per series, the error that makes it unusable
    (non-finite value) or None, so one bad series does not fail the batch.
    """
    expected = sum(sizes) * n_channels
    if isinstance(values, bytes | bytearray | memoryview):  # msgpack bin: float32 little-endian
        if len(values) != 4 * expected:
            raise InvalidInput(
                f"{len(values)} bytes, but 4 * sum(sizes) * n_channels = {4 * expected}",
                field=field,
            )
        out = np.frombuffer(values, dtype="<f4").astype(np.float32, copy=False)
        out = out.reshape(-1, n_channels)
        values = out.reshape(-1)  # for the error messages below
    else:
        if not isinstance(values, list):
            raise InvalidInput("values must be a flat array of numbers", field=field)
        if len(values) != expected:
            raise InvalidInput(
                f"{len(values)} values, but sum(sizes) * n_channels = {expected}", field=field
            )
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                msgspec.convert(values, _FLAT)  # numbers only: no strings, no booleans
                arr = np.fromiter(values, np.float32, expected)
            except (msgspec.ValidationError, TypeError, ValueError, OverflowError):
                # Slow path: anything that is not a usable number becomes NaN, reported below.
                arr = np.array([np.nan if _bad(v) else v for v in values], np.float32)
        out = arr.reshape(-1, n_channels)
    errors: list[InvalidInput | None] = [None] * len(sizes)
    bad = ~np.isfinite(out)
    if bad.any():
        bounds = np.cumsum([0, *sizes])
        bad_rows = np.flatnonzero(bad.any(axis=1))
        series_of = np.searchsorted(bounds, bad_rows, side="right") - 1
        for row, s in zip(bad_rows.tolist(), series_of.tolist(), strict=True):
            if errors[s] is None:
                col = int(np.flatnonzero(bad[row])[0])
                flat = row * n_channels + col
                errors[s] = _bad_number(_item(values[flat]), f"{field}[{flat}]")
    return out, errors
