"""Request bytes -> core `ForecastRequest`, fast, with errors naming the offending field.

orjson parses the body; msgspec validates everything but the value arrays (its errors carry the
JSON path); the arrays are converted and checked by numpy in one pass (`core.windows`). The
common /v1/forecast body takes a faster road (`_rows_request`: msgspec + simdjson, no Python
object per number) and falls back to that path for anything else. Strict
JSON has no NaN/Infinity: a body that uses them (as Python's json module writes) is re-read
leniently so that the error can name the element. Bodies sent as `application/msgpack` take the
same shapes (msgspec decodes them).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, TypeVar

import msgspec
import numpy as np
import orjson
import simdjson

from service.api.schemas import BatchWire, ForecastWire, SeriesWire
from service.core.errors import InvalidInput, LimitExceeded, MalformedBody, ServiceError
from service.core.types import ForecastRequest, SeriesFailure, SeriesInput
from service.core.windows import flat_to_windows, to_window

T = TypeVar("T")

_MSGPACK = msgspec.msgpack.Decoder()
_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")

def _field_of(error: msgspec.ValidationError) -> tuple[str, str]:
    m = _PATH.match(str(error))
    assert m is not None
    message, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    extra = _MISSING.search(message) or _UNKNOWN.search(message)
    if extra is not None:
        path = f"{path}.{extra.group(1)}" if path else extra.group(1)
    return message, path or "body"


def _lenient(body: bytes) -> Any:
    """Parse a body that is JSON except for NaN/Infinity literals (those become strings, which
    the value checks then reject by name).

    Only that: whatever else orjson refused stays refused. json.loads takes what orjson does not
    (nesting past orjson's depth limit, where it raises RecursionError; lone surrogates, which no
    answer could echo back; integers beyond 64 bits), so the result must survive orjson.dumps."""
    try:
        obj = json.loads(body, parse_constant=lambda c: c)
        orjson.dumps(obj)
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError):
        return None
    return obj


def decode_struct(body: bytes, kind: type[T], *, msgpack: bool = False) -> T:
    """orjson parses (fast, strict JSON), or msgspec for msgpack bodies; msgspec validates the
    structure around the values."""
    if msgpack:
        try:
            obj = _MSGPACK.decode(body)
        except msgspec.DecodeError as exc:
            raise MalformedBody(f"not valid msgpack: {exc}", field="body") from None
    else:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if not body.strip():
                raise MalformedBody("empty body: a JSON object is required",
                                    field="body") from None
            obj = _lenient(body)
            if obj is None:
                raise MalformedBody(f"not valid JSON: {exc}", field="body") from None
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        message, field = _field_of(exc)
        raise InvalidInput(message, field=field) from None


def _series(i: int, s: SeriesWire) -> SeriesInput:
    values, univariate = to_window(s.values, f"series[{i}].values")
    return SeriesInput(s.id, values, univariate, i, False, s.timestamps, s.start, s.freq)


class Limits:
    __slots__ = ("max_series", "max_points")

    def __init__(self, max_series: int, max_points: int) -> None:
        self.max_series = max_series
        self.max_points = max_points

    def check_count(self, n: int, field: str) -> None:
        if n == 0:
            raise InvalidInput("at least one series is required", field=field)
        if n > self.max_series:
            raise LimitExceeded(
                f"{n} series; the limit is {self.max_series} per request", field=field
            )

    def check_points(self, points: int, field: str) -> None:
        if points > self.max_points:
            raise LimitExceeded(
                f"{points} values; the limit is {self.max_points} per request", field=field
            )


def _check_unique(ids: list[str | int], field: str) -> None:
    if len(set(ids)) == len(ids):
        return
    seen: set[str | int] = set()
    for j, sid in enumerate(ids):
        if sid in seen:
            raise InvalidInput(f"duplicate id {sid!r}", field=f"{field}[{j}]")
        seen.add(sid)


def _row_form(
    series: list[SeriesWire], limits: Limits, *, partial: bool
) -> list[SeriesInput | SeriesFailure]:
    limits.check_count(len(series), "series")
    _check_unique([s.id for s in series], "series")
    out: list[SeriesInput | SeriesFailure] = []
    points = 0
    for i, s in enumerate(series):
        try:
            item = _series(i, s)
            points += item.values.size
        except ServiceError as exc:
            if not partial:
                raise
            out.append(SeriesFailure(s.id, exc))
            continue
        out.append(item)
    limits.check_points(points, "series")
    return out


def _rows_struct(wire: type[msgspec.Struct], values: Any, name: str) -> type[msgspec.Struct]:
    """`wire` with its `values` field typed (and the `series` field replaced), every other field,
    type and default taken from `wire` itself, so the two cannot drift apart."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(wire):
        kind = values if f.name in ("values", "series") else f.type
        fields.append((f.name, kind) if f.required else (f.name, kind, f.default))
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True)


# The common /v1/forecast body (rows of channels, every value a finite float32) takes a faster
# road than the general path: msgspec validates everything but the value arrays in one pass
# straight from the bytes (each `values` kept as its raw JSON text, `msgspec.Raw`), then simdjson
# parses each array's numbers into one float64 buffer, with no Python object per number. That
# buffer is the window only when the text is exactly a list of equal-length rows of numbers:
# simdjson's buffer flattens any nesting, so the shape is proven on the text itself (below).
# Anything else falls back to the general path, which is the one that explains what is wrong.
_ROWS_SERIES = _rows_struct(SeriesWire, msgspec.Raw, "RowsSeriesWire")
_ROWS_FORECAST = msgspec.json.Decoder(
    # (mypy ignore on the next line) a class built at import time by msgspec.defstruct is a valid
    # type at run time
    _rows_struct(ForecastWire, list[_ROWS_SERIES], "RowsForecastWire")  # type: ignore[valid-type]
)
_OPEN, _COMMA = ord("["), ord(",")
_parsers = threading.local()


def _numbers(text: msgspec.Raw) -> tuple[int, np.ndarray]:
    """(top-level length, every number of `text` flattened to float64); raises on anything that
    is not an array holding only numbers (and arrays), or a number beyond float64 or int64."""
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    doc = parser.parse(text)
    try:
        # (simdjson's own objects must be gone before the parser parses again: `del` below.)
        if not isinstance(doc, simdjson.Array):
            raise TypeError("not an array")
        return len(doc), np.frombuffer(doc.as_buffer(of_type="d"), np.float64)
    finally:
        del doc


def json_rows_window(text: msgspec.Raw) -> np.ndarray | None:
    """The JSON text of one `values` -> float32 [n, C], or None when it is not exactly n >= 1 rows
    of C >= 1 numbers each, finite in float32 (for the general path to explain)."""
    try:
        rows, flat = _numbers(text)
    except Exception:  # noqa: BLE001 - not numbers only, or not an array: the general path
        return None
    if rows == 0 or flat.size == 0 or flat.size % rows:
        return None
    width = flat.size // rows
    # The shape, on the text (it holds only numbers, brackets, commas and whitespace, simdjson
    # has checked): one '[' per row plus the outer one means every element is a flat array
    # (a scalar row or a nested array changes that count), and the commas from each row's '['
    # to the next row's must be C (C - 1 inside the row, one between rows; C - 1 after the
    # last row's), which equal-length rows give and ragged rows cannot.
    chars = np.frombuffer(text, np.uint8)
    opens = np.flatnonzero(chars == _OPEN)
    if opens.size != rows + 1:
        return None
    commas = np.add.reduceat(chars == _COMMA, opens[1:], dtype=np.intp)
    if commas[-1] != width - 1 or not (commas[:-1] == width).all():
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        out = flat.astype(np.float32).reshape(rows, width)
    return out if np.isfinite(out).all() else None


def _rows_request(body: bytes, limits: Limits) -> ForecastRequest | None:
    """The request when `body` is the common case, else None (nothing raised for bad input)."""
    try:
        wire: Any = _ROWS_FORECAST.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # + every ValidationError
        # Invalid UTF-8 raises UnicodeDecodeError, and arrays nested past msgspec's depth
        # limit (read whole as raw `values`) RecursionError: the general path answers both.
        return None
    series = wire.series
    limits.check_count(len(series), "series")
    _check_unique([s.id for s in series], "series")
    out: list[SeriesInput | SeriesFailure] = []
    points = 0
    for i, s in enumerate(series):
        values = json_rows_window(s.values)
        if values is None:
            return None
        points += values.size
        out.append(SeriesInput(s.id, values, False, i, False, s.timestamps, s.start, s.freq))
    limits.check_points(points, "series")
    return ForecastRequest(
        out, wire.model, wire.mode, wire.horizon, wire.level or [], wire.deadline_ms
    )


def forecast_request(body: bytes, limits: Limits, *, msgpack: bool = False) -> ForecastRequest:
    """POST /v1/forecast: any bad series fails the request (422 naming it)."""
    if not msgpack:
        req = _rows_request(body, limits)
        if req is not None:
            return req
    return general_forecast_request(body, limits, msgpack=msgpack)


def general_forecast_request(body: bytes, limits: Limits, *, msgpack: bool = False
                             ) -> ForecastRequest:
    """`forecast_request` without the fast road (`_rows_request`): every body shape, every error."""
    wire = decode_struct(body, ForecastWire, msgpack=msgpack)
    series = _row_form(wire.series, limits, partial=False)
    return ForecastRequest(
        series, wire.model, wire.mode, wire.horizon, wire.level or [], wire.deadline_ms
    )


def _columnar(wire: BatchWire, limits: Limits) -> list[SeriesInput | SeriesFailure]:
    if wire.ids is None or wire.sizes is None or wire.values is None:
        missing = next(k for k in ("ids", "sizes", "values") if not _present(wire, k))
        raise InvalidInput("columnar form needs ids, sizes and values", field=missing)
    ids, sizes, c = wire.ids, wire.sizes, wire.n_channels
    limits.check_count(len(ids), "ids")
    if len(sizes) != len(ids):
        raise InvalidInput(f"{len(sizes)} sizes for {len(ids)} ids", field="sizes")
    if wire.starts is not None and len(wire.starts) != len(ids):
        raise InvalidInput(f"{len(wire.starts)} starts for {len(ids)} ids", field="starts")
    if (wire.starts is None) != (wire.freq is None):
        raise InvalidInput("starts and freq go together",
                           field="freq" if wire.freq is None else "starts")
    _check_unique(ids, "ids")
    limits.check_points(sum(sizes) * c, "values")
    flat, errors = flat_to_windows(wire.values, sizes, c, "values")
    out: list[SeriesInput | SeriesFailure] = []
    offset = 0
    for i, (sid, n) in enumerate(zip(ids, sizes, strict=True)):
        error = errors[i]
        if error is not None:
            out.append(SeriesFailure(sid, error))
        else:
            start = wire.starts[i] if wire.starts is not None else None
            out.append(SeriesInput(sid, flat[offset : offset + n], c == 1, i, True,
                                   None, start, wire.freq))
        offset += n
    return out


def _present(wire: BatchWire, key: str) -> bool:
    return getattr(wire, key) is not None


def batch_request(body: bytes, limits: Limits, *, msgpack: bool = False) -> ForecastRequest:
    """POST /v1/forecast/batch: row or columnar form; a bad series becomes its own error entry.

    In a msgpack body the columnar `values` may be a bin of little-endian float32 (no parsing)."""
    wire = decode_struct(body, BatchWire, msgpack=msgpack)
    columnar = any(_present(wire, k) for k in ("ids", "sizes", "values"))
    if columnar and wire.series is not None:
        raise InvalidInput("use either series (rows) or ids/sizes/values (columns)",
                           field="series")
    if columnar:
        series = _columnar(wire, limits)
    elif wire.series is not None:
        series = _row_form(wire.series, limits, partial=True)
    else:
        raise InvalidInput("series (rows) or ids/sizes/values (columns) is required",
                           field="series")
    return ForecastRequest(
        series, wire.model, wire.mode, wire.horizon, wire.level or [], wire.deadline_ms
    )
