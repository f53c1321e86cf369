"""Long DataFrames <-> the service's wire forms (JSON rows, Arrow IPC stream), and back.

In: one row per series and time step, an id column, an optional time column and one or several
value columns. Out: the Ray batch job's columns, `unique_id`, `ds`, one column per value column
and `<col>-lo-<level>` / `<col>-hi-<level>` per interval level; the answering model, version and
mode are in `DataFrame.attrs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

ID, DS = "unique_id", "ds"
ARROW = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Prepared:
    """A request DataFrame renamed to `unique_id`/`ds`, sorted by series then time."""

    frame: pd.DataFrame
    targets: list[str]
    has_time: bool
    n_series: int


def prepare(df: pd.DataFrame, id_col: str, time_col: str,
            target_cols: list[str] | None) -> Prepared:
    if id_col not in df.columns:
        raise ValueError(f"the DataFrame has no id column {id_col!r} (columns: {list(df.columns)})")
    has_time = time_col in df.columns
    if target_cols is None:
        target_cols = [c for c in df.columns if c not in (id_col, time_col)
                       and pd.api.types.is_numeric_dtype(df[c])
                       and not pd.api.types.is_bool_dtype(df[c])]
    if not target_cols:
        raise ValueError("no value column: pass target_cols or give the DataFrame numeric columns")
    clash = {ID, DS} & set(target_cols)
    if clash:
        raise ValueError(f"value columns cannot be named {sorted(clash)}")
    cols = [id_col, *([time_col] if has_time else []), *target_cols]
    frame = df[cols].rename(columns={id_col: ID, time_col: DS})
    # Series contiguous, in time order (the first appearance order of ids is kept).
    order = pd.Index(pd.unique(frame[ID]))
    frame = frame.assign(_k=order.get_indexer(frame[ID]))
    frame = frame.sort_values(["_k", DS] if has_time else ["_k"], kind="stable")
    frame = frame.drop(columns="_k").reset_index(drop=True)
    return Prepared(frame, list(target_cols), has_time, len(order))


def to_arrow(p: Prepared) -> bytes:
    table = pa.Table.from_pandas(p.frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    out: bytes = sink.getvalue().to_pybytes()
    return out


def from_arrow(body: bytes) -> tuple[pd.DataFrame, dict[str, str]]:
    with pa.ipc.open_stream(pa.py_buffer(body)) as reader:
        table = reader.read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table.replace_schema_metadata(None).to_pandas(), meta


def stamp(value: Any) -> Any:
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def stamps(values: pd.Series) -> list[Any]:
    """Times as the service reads them: ISO 8601 text for datetimes, numbers as numbers."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return [t.isoformat() for t in values]
    return [stamp(v) for v in values.tolist()]


def json_series(p: Prepared) -> list[dict[str, Any]]:
    """Row-form series (values rows [n, C]; timestamps when the frame has time)."""
    out: list[dict[str, Any]] = []
    for sid, g in p.frame.groupby(ID, sort=False):
        item: dict[str, Any] = {"id": stamp(sid),
                                "values": g[p.targets].to_numpy(np.float64).tolist()}
        if p.has_time:
            item["timestamps"] = stamps(g[DS])
        out.append(item)
    return out


def from_json(answer: dict[str, Any], p: Prepared) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """A JSON forecast answer -> the long frame (the Arrow answer's columns), and failures."""
    failures: list[dict[str, Any]] = []
    ids: list[Any] = []
    times: list[Any] = []
    blocks: list[np.ndarray] = []
    bands: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    c = len(p.targets)
    for item in answer["forecasts"]:
        if "error" in item:
            failures.append(item)
            continue
        values = np.asarray(item["values"], np.float32).reshape(-1, c)  # [h, C]
        h = values.shape[0]
        ids += [item["id"]] * h
        if p.has_time:
            times += item.get("timestamps") or [None] * h
        blocks.append(values)
        for label, band in (item.get("intervals") or {}).items():
            lows, highs = bands.setdefault(label, ([], []))
            lows.append(np.asarray(band["lower"], np.float32).reshape(h, c))
            highs.append(np.asarray(band["upper"], np.float32).reshape(h, c))
    data: dict[str, Any] = {ID: ids}
    if p.has_time:
        dtype = p.frame[DS].dtype
        if pd.api.types.is_datetime64_any_dtype(dtype):
            data[DS] = pd.to_datetime(pd.Series(times, dtype=object)).astype(dtype)
        else:
            data[DS] = pd.Series(times).astype(dtype)
    stacked = np.concatenate(blocks) if blocks else np.zeros((0, c), np.float32)
    for j, name in enumerate(p.targets):
        data[name] = stacked[:, j]
    joined = {label: (np.concatenate(los), np.concatenate(his))
              for label, (los, his) in bands.items()}
    for j, name in enumerate(p.targets):  # the batch job's order: column, then level
        for label, (lo, hi) in joined.items():
            data[f"{name}-lo-{label}"] = lo[:, j]
            data[f"{name}-hi-{label}"] = hi[:, j]
    frame = pd.DataFrame(data)
    if len(frame) and frame[ID].dtype != p.frame[ID].dtype:
        frame[ID] = frame[ID].astype(p.frame[ID].dtype)
    return frame, failures
