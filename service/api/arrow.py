"""Arrow IPC on POST /v1/forecast/batch: `application/vnd.apache.arrow.stream` in and out.

Long form, as pandas/Nixtla users hold their data and as the Ray batch job reads and writes it:
one row per series and time step, `unique_id`, optional `ds`, and every other column a value
column (channel). The rows of a series are contiguous and in time order; its window is its last
`lookback` rows (the core takes them). Options travel in the query string: `model`, `mode`, `h`
(or `horizon`), `level` (repeated), `deadline_ms`.

The value columns are read by Arrow into numpy without a Python object per value: one float32
column is used in place (zero-copy), several are stacked once into [rows, C]; every series'
window is a view of that array. The answer has the batch job's columns (`unique_id`, `ds`, one
per value column, `<col>-lo-<level>` / `<col>-hi-<level>`); the model, version, mode, provider,
timing and the per-series failures are in the schema metadata. The future `ds` continues each
series by its last step, like the batch job.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from service.api.decode import Limits
from service.core.errors import InvalidInput, MalformedBody
from service.core.types import (
    ForecastRequest,
    ForecastResult,
    Mode,
    SeriesFailure,
    SeriesForecast,
    SeriesInput,
)

ARROW = "application/vnd.apache.arrow.stream"
ID, DS = "unique_id", "ds"
_MODES: tuple[Mode, ...] = ("fast", "accurate", "auto")


@dataclass(slots=True)
class ArrowLayout:
    """What the answer needs from the request: column names and types, and each series' time."""

    id_type: pa.DataType
    value_cols: list[str]
    time_type: pa.DataType | None
    last: np.ndarray | None
    """Per series: its last `ds` as an integer in the time column's unit."""
    step: np.ndarray | None
    """Per series: its last step (the future continues by it)."""


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name) from None


def _options(query: bytes) -> tuple[str | None, Mode, int | None, list[float], float | None]:
    model: str | None = None
    mode: Mode = "fast"
    horizon: int | None = None
    levels: list[float] = []
    deadline: float | None = None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == "model":
            model = value or None
        elif key == "mode":
            if value not in _MODES:
                raise InvalidInput(f"mode must be one of {', '.join(_MODES)}, got {value!r}",
                                   field="mode")
            mode = value
        elif key in ("h", "horizon"):
            if not value.isdigit() or int(value) < 1:
                raise InvalidInput(f"{key} must be a positive integer, got {value!r}", field=key)
            horizon = int(value)
        elif key == "level":
            level = _float("level", value)
            if not 0 < level < 100:
                raise InvalidInput(f"level must be in (0, 100), got {value}", field="level")
            levels.append(level)
        elif key == "deadline_ms":
            deadline = _float("deadline_ms", value)
            if deadline <= 0:
                raise InvalidInput("deadline_ms must be positive", field="deadline_ms")
        else:
            raise InvalidInput(f"unknown query parameter {key!r}", field=key)
    return model, mode, horizon, levels, deadline


def _read(body: bytes) -> pa.Table:
    if not body:
        raise MalformedBody("empty body: an Arrow IPC stream is required", field="body")
    try:
        with pa.ipc.open_stream(pa.py_buffer(body)) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError) as exc:
        raise MalformedBody(f"not a valid Arrow IPC stream: {exc}", field="body") from None


def _time_ints(col: pa.Array) -> np.ndarray:
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date64(t) or pa.types.is_duration(t):
        storage: pa.DataType = pa.int64()
    elif pa.types.is_date32(t):
        storage = pa.int32()
    elif pa.types.is_integer(t):
        storage = t
    else:
        raise InvalidInput(f"ds has type {t}: expected timestamps, dates or integers", field=DS)
    if col.null_count:
        row = int(np.flatnonzero(~col.is_valid().to_numpy(zero_copy_only=False))[0])
        raise InvalidInput("ds must not be null", field=f"{DS}[{row}]")
    return np.asarray(col.cast(storage).to_numpy(zero_copy_only=False), np.int64)


def _values(table: pa.Table, cols: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The value columns as float32 [rows, C] (nulls become NaN, refused per series), and which
    rows hold a non-finite value (None when all are finite: checked column by column, on the
    contiguous arrays, before the stacking)."""
    arrays: list[np.ndarray] = []
    for name in cols:
        col = table.column(name).combine_chunks()
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise InvalidInput(f"value column {name!r} has type {col.type}: expected numbers",
                               field=name)
        if col.type != pa.float32():
            col = col.cast(pa.float32(), safe=False)
        arrays.append(col.to_numpy(zero_copy_only=False))  # zero-copy when there are no nulls
    finite = [np.isfinite(a) for a in arrays]
    bad = None if all(f.all() for f in finite) else ~np.logical_and.reduce(finite)
    if len(arrays) == 1:
        return arrays[0].reshape(-1, 1), bad
    return np.column_stack(arrays), bad


def batch_request(body: bytes, limits: Limits, query: bytes) -> tuple[ForecastRequest, ArrowLayout]:
    """An Arrow IPC body -> the core's request (a bad series becomes its own failure)."""
    model, mode, horizon, levels, deadline = _options(query)
    table = _read(body)
    names = table.column_names
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidInput(f"column {twice!r} appears more than once", field=twice)
    if ID not in names:
        raise InvalidInput(f"the stream needs a {ID!r} column (has {names})", field=ID)
    value_cols = [c for c in names if c not in (ID, DS)]
    if not value_cols:
        raise InvalidInput("the stream needs at least one value column", field="values")
    n = table.num_rows
    if n == 0:
        raise InvalidInput("at least one series is required", field=ID)
    limits.check_points(n * len(value_cols), "values")
    ids = table.column(ID).combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
            or pa.types.is_integer(ids.type)):
        raise InvalidInput(f"unique_id has type {ids.type}: expected strings or integers",
                           field=ID)
    if ids.null_count:
        raise InvalidInput("unique_id must not be null", field=ID)
    # Runs of equal ids, found by Arrow (no Python object per row).
    changes = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.concatenate(([0], np.flatnonzero(changes) + 1))
    sizes = np.diff(np.append(starts, n))
    limits.check_count(len(starts), ID)
    run_ids = ids.take(pa.array(starts)).to_pylist()
    if len(set(run_ids)) != len(run_ids):
        seen: set[object] = set()
        for k, sid in enumerate(run_ids):
            if sid in seen:
                raise InvalidInput(f"the rows of series {sid!r} are not contiguous",
                                   field=f"{ID}[{int(starts[k])}]")
            seen.add(sid)
    values, bad_rows = _values(table, value_cols)

    last = step = None
    time_type = None
    time_bad: np.ndarray | None = None
    if DS in names:
        ds = table.column(DS).combine_chunks()
        time_type = ds.type
        ticks = _time_ints(ds)
        ends = starts + sizes - 1
        last = ticks[ends]
        prev = ticks[np.maximum(ends - 1, starts)]
        step = last - prev
        gaps = np.diff(ticks)
        # A step <= 0 inside a series: not in time order, or a duplicated ds.
        time_bad = np.zeros(n, bool)
        time_bad[1:] = gaps <= 0
        time_bad[starts] = False
        if not time_bad.any():
            time_bad = None

    series: list[SeriesInput | SeriesFailure] = []
    for k, sid in enumerate(run_ids):
        a, b = int(starts[k]), int(starts[k] + sizes[k])
        if bad_rows is not None and bad_rows[a:b].any():
            row = a + int(np.flatnonzero(bad_rows[a:b])[0])
            col = int(np.flatnonzero(~np.isfinite(values[row]))[0])
            series.append(SeriesFailure(sid, InvalidInput(
                f"value must be finite, got {values[row, col]}",
                field=f"{value_cols[col]}[{row}]")))
            continue
        if time_bad is not None and time_bad[a:b].any():
            row = a + int(np.flatnonzero(time_bad[a:b])[0])
            series.append(SeriesFailure(sid, InvalidInput(
                "ds must increase within a series (duplicated or out-of-order time)",
                field=f"{DS}[{row}]")))
            continue
        if step is not None and sizes[k] < 2:
            series.append(SeriesFailure(sid, InvalidInput(
                "one row: the time step cannot be inferred", field=f"{DS}[{a}]")))
            continue
        series.append(SeriesInput(sid, values[a:b], False, k, True))
    req = ForecastRequest(series, model, mode, horizon, levels, deadline)
    return req, ArrowLayout(ids.type, value_cols, time_type, last, step)


def _seconds_per_tick(t: pa.DataType) -> float:
    if pa.types.is_timestamp(t) or pa.types.is_duration(t):
        return {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[t.unit]
    if pa.types.is_date64(t):
        return 1e-3
    if pa.types.is_date32(t):
        return 86_400.0
    return 1.0  # integer time: its own units, as /v1/actuals reads numbers


def attach_times(result: ForecastResult, layout: ArrowLayout, *, iso: bool = False) -> None:
    """Give each forecast its future times (epoch seconds, or the integers of an integer `ds`)
    so that the live-accuracy memory can remember it, as it does JSON forecasts with time.
    ``iso``: ISO 8601 text instead of epoch seconds (UTC, no offset), as the JSON answer of a
    JSON request writes them, for an Arrow request answered in JSON."""
    if layout.time_type is None or layout.last is None or layout.step is None:
        return
    scale = _seconds_per_tick(layout.time_type)
    integral = pa.types.is_integer(layout.time_type)
    steps = np.arange(1, result.horizon + 1)
    for i, r in enumerate(result.results):
        if isinstance(r, SeriesForecast):
            ticks = layout.last[i] + layout.step[i] * steps
            if integral:
                r.timestamps = ticks.tolist()
            elif iso:
                stamps = np.round(ticks * scale * 1e6).astype("datetime64[us]")
                r.timestamps = np.datetime_as_string(stamps, unit="s").tolist()
            else:
                r.timestamps = (ticks * scale).tolist()


def forecast_arrow(result: ForecastResult, layout: ArrowLayout, total_ms: float) -> bytes:
    """The answer as an Arrow IPC stream (long form, the batch job's columns)."""
    h = result.horizon
    ok: list[int] = []
    forecasts: list[SeriesForecast] = []
    failures: list[dict[str, object]] = []
    for i, r in enumerate(result.results):
        if isinstance(r, SeriesForecast):
            ok.append(i)
            forecasts.append(r)
        else:
            failures.append({"id": r.id, "error": r.error.to_dict()})
    k = len(ok)
    ids = pa.array([f.id for f in forecasts], layout.id_type) if k else pa.array([],
                                                                                 layout.id_type)
    cols: dict[str, pa.Array] = {ID: ids.take(pa.array(np.repeat(np.arange(k), h)))}
    if layout.time_type is not None and layout.last is not None and layout.step is not None:
        index = np.asarray(ok, np.int64)
        ticks = (layout.last[index, None]
                 + layout.step[index, None] * np.arange(1, h + 1)).reshape(-1)  # [k * h]
        storage = pa.int32() if pa.types.is_date32(layout.time_type) else pa.int64()
        if pa.types.is_integer(layout.time_type):
            storage = layout.time_type
        cols[DS] = pa.array(ticks.astype(storage.to_pandas_dtype()), storage).cast(
            layout.time_type)
    c = len(layout.value_cols)
    values = (np.stack([f.values.reshape(h, c) for f in forecasts]) if k
              else np.zeros((0, h, c), np.float32))  # [k, h, C]
    for j, name in enumerate(layout.value_cols):
        cols[name] = pa.array(np.ascontiguousarray(values[:, :, j]).reshape(-1), pa.float32())
    labels = list(forecasts[0].intervals) if k and forecasts[0].intervals else []
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label in labels:
        bands[label] = (
            np.stack([f.intervals[label][0].reshape(h, c) for f in forecasts
                      if f.intervals is not None]),  # [k, h, C]
            np.stack([f.intervals[label][1].reshape(h, c) for f in forecasts
                      if f.intervals is not None]),
        )
    for j, name in enumerate(layout.value_cols):  # the batch job's order: column, then level
        for label, (lo, hi) in bands.items():
            cols[f"{name}-lo-{label}"] = pa.array(
                np.ascontiguousarray(lo[:, :, j]).reshape(-1), pa.float32())
            cols[f"{name}-hi-{label}"] = pa.array(
                np.ascontiguousarray(hi[:, :, j]).reshape(-1), pa.float32())
    meta = {
        "model": result.model,
        "version": str(result.version),
        "mode": result.mode,
        "provider": result.provider,
        "horizon": str(h),
        "failures": orjson.dumps(failures).decode(),
        "timing": orjson.dumps({"total_ms": round(total_ms, 3),
                                "queue_ms": round(result.queue_ms, 3),
                                "inference_ms": round(result.inference_ms, 3)}).decode(),
    }
    table = pa.table(cols).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    out: bytes = sink.getvalue().to_pybytes()
    return out
