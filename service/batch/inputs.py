"""What an input file holds, and series -> model windows, one Arrow block at a time.

Two layouts (Parquet or CSV; a file or a directory of files):

* long: one row per series and time step: `unique_id`, `ds`, and one column per channel (every
  other numeric column, or those named). Every series has the same channels.
* wide: one column per (univariate) series, named by its id, and a shared time column (`ds`, or
  `date` as in the ETT files). A series that starts later than the file has empty cells before
  its first value; forecasts come back in long form with the value column `y`.

A series' window is its last `lookback` rows in time order. Rows before a series' first complete
row (every channel present) are padding and ignored; a missing or non-finite value, a missing or
duplicated `ds` inside the window fails that series (and only it) with a reason. Values before
the window are not read, so they cannot fail a series. The future `ds` continues the window by
its last step (the last gap), like the service's time axis for `timestamps`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from service.batch import JobError

log = logging.getLogger(__name__)

FileFormat = Literal["parquet", "csv"]
Layout = Literal["long", "wide"]

ID, DS, VALUE = "unique_id", "ds", "y"
"""Output column names (and the id/value names of a wide file once melted)."""

_SUFFIXES: dict[str, FileFormat] = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".gz": "csv", ".bz2": "csv",
}


@dataclass(frozen=True, slots=True)
class InputSpec:
    """The input as the driver understood it; everything the workers need to read it."""

    path: str
    file_format: FileFormat
    layout: Layout
    id_col: str
    """Long layout: the series id column (wide: the column names are the ids)."""
    time_col: str
    value_cols: tuple[str, ...]
    """Long: the channels of every series. Wide: the series."""
    time_type: pa.DataType
    id_type: pa.DataType
    size_bytes: int

    @property
    def channels(self) -> tuple[str, ...]:
        """Channel (output value column) names of every series."""
        return self.value_cols if self.layout == "long" else (VALUE,)

    @property
    def read_columns(self) -> list[str]:
        if self.layout == "long":
            return [self.id_col, self.time_col, *self.value_cols]
        return [self.time_col, *self.value_cols]


def _is_remote(path: str) -> bool:
    return "://" in path


def _file_format(path: str) -> tuple[FileFormat, int]:
    """Parquet or CSV from the name (a directory: from its files), and the size in bytes."""
    if _is_remote(path):
        suffix = Path(path.rstrip("/")).suffix.lower()
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix], 0
        raise JobError(f"cannot tell the format of {path}: name it *.parquet or *.csv")
    p = Path(path)
    if not p.exists():
        raise JobError(f"input {path} does not exist")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))
    )
    if not files:
        raise JobError(f"input directory {path} holds no files")
    formats = {_SUFFIXES.get(f.suffix.lower()) for f in files}
    if len(formats) != 1 or None in formats:
        names = ", ".join(sorted({f.suffix or f.name for f in files}))
        raise JobError(
            f"cannot tell the format of {path} ({names}): expected *.parquet or *.csv files"
        )
    fmt = formats.pop()
    assert fmt is not None
    return fmt, sum(f.stat().st_size for f in files)


def _numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t))


def time_storage(t: pa.DataType) -> pa.DataType:
    """The integer type a time column is computed in (timestamps: their unit; dates: days)."""
    if pa.types.is_timestamp(t) or pa.types.is_date64(t):
        return pa.int64()
    if pa.types.is_date32(t):
        return pa.int32()
    if pa.types.is_integer(t):
        return t
    raise JobError(f"time column type {t}: expected timestamps, dates or integers")


def inspect_input(
    path: str,
    *,
    layout: Layout | None = None,
    id_col: str = ID,
    time_col: str | None = None,
    value_cols: tuple[str, ...] = (),
) -> InputSpec:
    """Read the schema only (no data) and check that the job can run on this input."""
    import pyarrow.dataset as pds

    fmt, size = _file_format(path)
    try:
        schema = pds.dataset(path, format=fmt).schema
    except (pa.ArrowException, OSError) as exc:
        raise JobError(f"cannot read {path} as {fmt}: {exc}") from None
    names = schema.names
    if layout is None:
        layout = "long" if id_col in names else "wide"
    if time_col is None:
        time_col = next((c for c in (DS, "date") if c in names), None)
        if time_col is None:
            raise JobError(f"{path}: no time column (ds or date); name it with --time-col")
    elif time_col not in names:
        raise JobError(f"{path}: no time column {time_col!r} (columns: {', '.join(names)})")
    time_type = schema.field(time_col).type
    try:
        time_storage(time_type)
    except JobError:
        raise JobError(
            f"{path}: time column {time_col!r} is {time_type}; expected timestamps (ISO 8601 "
            "in CSV), dates or integers"
        ) from None
    if layout == "long":
        if id_col not in names:
            raise JobError(f"{path}: long layout needs an id column {id_col!r} "
                           f"(columns: {', '.join(names)})")
        id_type = schema.field(id_col).type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)
                or pa.types.is_integer(id_type) or pa.types.is_dictionary(id_type)):
            raise JobError(f"{path}: id column {id_col!r} is {id_type}; expected text or integers")
        reserved = {id_col, time_col}
    else:
        id_type = pa.string()
        reserved = {time_col}
    if value_cols:
        missing = [c for c in value_cols if c not in names]
        if missing:
            raise JobError(f"{path}: no column {', '.join(map(repr, missing))}")
        bad = [c for c in value_cols if not _numeric(schema.field(c).type)]
        if bad:
            raise JobError(f"{path}: value column(s) {', '.join(map(repr, bad))} are not numeric")
    else:
        others = [c for c in names if c not in reserved]
        value_cols = tuple(c for c in others if _numeric(schema.field(c).type))
        skipped = [c for c in others if c not in value_cols]
        if skipped:
            log.warning("ignoring non-numeric columns %s", ", ".join(skipped))
        if not value_cols:
            raise JobError(f"{path}: no numeric value columns besides {', '.join(reserved)}")
    if pa.types.is_dictionary(id_type):
        id_type = id_type.value_type
    return InputSpec(path, fmt, layout, id_col, time_col, value_cols, time_type, id_type, size)


def csv_column_types(spec: InputSpec) -> dict[str, pa.DataType]:
    """Pin the CSV column types, so that every block and file reads alike (an all-empty block
    would otherwise read as null, an all-integer one as int64)."""
    types = {c: pa.float64() for c in spec.value_cols}
    types[spec.time_col] = spec.time_type
    if spec.layout == "long":
        types[spec.id_col] = spec.id_type
    return types


# -- per block ------------------------------------------------------------------------------------


def melt_wide(block: pa.Table, *, time_col: str, value_cols: tuple[str, ...]) -> pa.Table:
    """Wide rows -> long rows (`unique_id` = column name, the time column, `y`)."""
    rows = block.num_rows
    ids = pa.array(np.repeat(np.array(value_cols, dtype=object), rows), pa.string())
    times = pa.concat_arrays([block[time_col].combine_chunks()] * len(value_cols))
    values = pa.concat_arrays(
        [pc.cast(block[c], pa.float64()).combine_chunks() for c in value_cols]
    )
    return pa.table({ID: ids, time_col: times, VALUE: values})


def window_schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        (ID, id_type), ("values", pa.large_list(pa.float32())), ("last", pa.int64()),
        ("step", pa.int64()), ("reason", pa.string()),
    ])


def _to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Float64 values with NaN for nulls (the same float64 -> float32 path as the JSON API)."""
    return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), np.float64)


def _stamp(value: int, storage: pa.DataType, time_type: pa.DataType) -> str:
    return str(pa.array([value], storage).cast(time_type)[0].as_py())


@dataclass(slots=True)
class _Series:
    """A block's rows sorted by (id, time), cut into series: rows starts[i]:ends[i]."""

    table: pa.Table
    starts: np.ndarray
    ends: np.ndarray
    values: np.ndarray
    """float32 [rows, C]; NaN where missing."""
    complete: np.ndarray
    """Rows where every channel is present and finite."""
    unnamed: pa.Table
    """Rows without an id (they belong to no series)."""


def _series(block: pa.Table, id_col: str, time_col: str, value_cols: tuple[str, ...]) -> _Series:
    unnamed = block.filter(pc.is_null(block[id_col]))
    if unnamed.num_rows:
        block = block.filter(pc.is_valid(block[id_col]))
    t = block.sort_by([(id_col, "ascending"), (time_col, "ascending")])  # null times last
    n = t.num_rows
    if n > 1:
        ids = t[id_col].combine_chunks()
        change = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
    else:
        starts = np.zeros(n, dtype=np.int64)
    ends = np.append(starts[1:], n).astype(np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.column_stack([_to_numpy(t[c]) for c in value_cols]).astype(np.float32)
    values = values.reshape(n, len(value_cols))
    complete = np.asarray(np.isfinite(values).all(axis=1), dtype=bool)
    return _Series(t, starts, ends, values, complete, unnamed)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(a, a + k) for a, k in zip(starts, counts)), without a Python loop."""
    offsets = np.cumsum(counts) - counts
    within = np.arange(counts.sum()) - np.repeat(offsets, counts)
    out: np.ndarray = np.repeat(starts, counts) + within
    return out


def tail_rows(block: pa.Table, *, id_col: str, time_col: str, value_cols: tuple[str, ...],
              lookback: int) -> pa.Table:
    """Drop the rows no window can need, before the shuffle (a combiner: long histories shrink
    to about `lookback` rows per series and block).

    Kept per series and block: its last `lookback` rows, and the last complete row before them.
    The union over blocks then holds each series' last `lookback` rows and, when there is one,
    a complete row before them, which is all `build_windows` looks at (the extra row tells a
    missing value inside a long series from a series that starts late)."""
    s = _series(block, id_col, time_col, value_cols)
    n = s.table.num_rows
    if n == 0:
        return block
    tail = np.maximum(s.starts, s.ends - lookback)  # first tail row per series
    if not (tail > s.starts).any():
        return pa.concat_tables([s.table, s.unnamed]) if s.unnamed.num_rows else s.table
    keep = np.zeros(n, dtype=bool)
    keep[_ranges(tail, s.ends - tail)] = True
    last_complete = np.maximum.accumulate(np.where(s.complete, np.arange(n), -1))
    before = last_complete[np.maximum(tail - 1, 0)]
    extra = before[(tail > s.starts) & (before >= s.starts)]
    keep[extra] = True
    kept = s.table.take(pa.array(np.flatnonzero(keep)))
    return pa.concat_tables([kept, s.unnamed]) if s.unnamed.num_rows else kept


def build_windows(
    block: pa.Table,
    *,
    id_col: str,
    time_col: str,
    value_cols: tuple[str, ...],
    time_type: pa.DataType,
    id_type: pa.DataType,
    lookback: int,
) -> pa.Table:
    """Rows of whole series (in any order) -> one row per series: its last `lookback` rows as a
    flat float32 list (time-major, channels innermost), its last `ds` and step, and the reason
    it cannot be scored (or null). Vectorised over the block: no per-series Python except for
    the series that fail."""
    storage = time_storage(time_type)
    s = _series(block, id_col, time_col, value_cols)
    t, starts, ends, c = s.table, s.starts, s.ends, len(value_cols)
    n = t.num_rows
    times = t[time_col]
    time_ok = np.asarray(times.is_valid().to_numpy(zero_copy_only=False), bool)
    ticks = np.asarray(
        pc.cast(times, storage).fill_null(0).to_numpy(zero_copy_only=False), np.int64
    )

    # Padding before a series' first complete row is not part of it (late starts, wide files).
    positions = np.arange(n)
    first = np.minimum.reduceat(np.where(s.complete, positions, n), starts) if n else starts
    first = np.minimum(first, ends)
    take = np.minimum(ends - first, lookback)
    offsets = np.concatenate([[0], np.cumsum(take)])
    series_of = np.repeat(np.arange(len(starts)), take)  # window row -> series
    rows = _ranges(ends - take, take)
    win = s.values[rows]  # [sum(take), C]
    win_ticks = ticks[rows]

    reasons: list[str | None] = [None] * len(starts)
    for i in np.flatnonzero(take == 0):
        reasons[i] = "no complete row (a value is missing in every row)"
    bad_time = ~time_ok[rows]
    for r in _first_per_series(bad_time, series_of):
        reasons[series_of[r]] = "missing ds within the model window"
    if len(rows) > 1:
        dup = (win_ticks[1:] == win_ticks[:-1]) & (series_of[1:] == series_of[:-1])
        dup = np.concatenate([[False], dup]) & ~bad_time
        for r in _first_per_series(dup, series_of):
            i = series_of[r]
            if reasons[i] is None:
                reasons[i] = f"duplicate ds {_stamp(win_ticks[r], storage, time_type)}"
    for r in _first_per_series(~np.isfinite(win).all(axis=1), series_of):
        i = series_of[r]
        if reasons[i] is None:
            col = value_cols[int(np.flatnonzero(~np.isfinite(win[r]))[0])]
            when = _stamp(win_ticks[r], storage, time_type) if time_ok[rows[r]] else "null"
            reasons[i] = f"missing or non-finite {col} at ds {when} (inside the model window)"

    last = np.zeros(len(starts), dtype=np.int64)
    step = np.zeros(len(starts), dtype=np.int64)
    if len(rows):
        has = take > 0
        last[has] = win_ticks[offsets[1:][has] - 1]
        two = take >= 2
        step[two] = last[two] - win_ticks[offsets[1:][two] - 2]
    out = pa.table(
        {
            ID: t[id_col].take(pa.array(starts)).cast(id_type),
            "values": pa.LargeListArray.from_arrays(pa.array(offsets * c, pa.int64()),
                                                    pa.array(win.reshape(-1), pa.float32())),
            "last": pa.array(last, pa.int64()),
            "step": pa.array(step, pa.int64()),
            "reason": pa.array(reasons, pa.string()),
        },
        schema=window_schema(id_type),
    )
    unnamed = s.unnamed.num_rows
    if unnamed:
        missing = pa.table({ID: pa.nulls(1, id_type),
                            "values": pa.array([[]], pa.large_list(pa.float32())),
                            "last": [0], "step": [0],
                            "reason": [f"{unnamed} rows without {id_col}"]},
                           schema=window_schema(id_type))
        out = pa.concat_tables([out, missing])
    return out


def _first_per_series(mask: np.ndarray, series_of: np.ndarray) -> np.ndarray:
    """Window-row indices of the first True row of each series that has one."""
    hits = np.flatnonzero(mask)
    if not len(hits):
        return hits
    _, first = np.unique(series_of[hits], return_index=True)
    return hits[first]
