"""Real-data loading with the standard long-term forecasting protocol.

The protocol (see docs and ``../shared/papers/METHODS.md``): channels z-scored with a scaler fit on
the train slice only, stride-1 windows, and fixed split borders per dataset family:

* ETT hourly: train ``[0, 8640)``, val ``[8640 - L, 11520)``, test ``[11520 - L, 14400)``;
* ETT 15-minute: the same borders times 4;
* anything else (including a user's own CSV): 70/10/20 with the val/test slices reaching back L rows
  so that their first window's forecast starts right after the previous split.

Two layouts of a user's CSV (``docs/own-data.md``):

* wide: a timestamp column and one column per channel (the ETT files);
* long: one row per series and time step, ``unique_id``, ``ds`` and the value columns (every series
  has the same channels), as the Ray batch job reads them (``service/batch/inputs.py``). One model
  is trained over all the series: each series is split chronologically on its own by the same
  70/10/20 rule, the scaler is fit on the union of the series' train slices only (one mean and std
  per channel, as the served model applies it), and a window never crosses two series.

Timestamps must be regular: in time order, one row per step, no duplicate and no gap (a calendar
frequency such as month starts counts as regular); the error names the rows around the first gap.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"

SplitRule = Literal["ett_hour", "ett_minute", "ratio"]
Features = Literal["M", "S"]
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, and the column and row if any."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    file: str
    freq: str
    split: SplitRule
    target: str = "OT"
    date_column: str | None = "date"  # None: detected (see ``find_time_column``)


CATALOGUE: dict[str, DatasetInfo] = {
    info.name.lower(): info
    for info in (
        DatasetInfo("ETTh1", "ETTh1.csv", "h", "ett_hour"),
        DatasetInfo("ETTh2", "ETTh2.csv", "h", "ett_hour"),
        DatasetInfo("ETTm1", "ETTm1.csv.gz", "15min", "ett_minute"),
        DatasetInfo("exchange_rate", "exchange_rate.csv", "D", "ratio"),
        DatasetInfo("national_illness", "national_illness.csv", "7D", "ratio"),
    )
}
CATALOGUE["ili"] = CATALOGUE["national_illness"]


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "ETTh1"
    lookback: int = 336
    horizon: int = 96
    features: Features = "M"
    data_dir: str | None = None
    target: str | None = None
    date_column: str | None = None
    id_column: str | None = None
    """Series id column of a long file (default: ``unique_id`` when the file has one)."""


def dataset_stem(dataset: str) -> str:
    """A dataset's short name for run folders: ``ETTh1`` or a CSV path's file name without
    ``.csv``/``.csv.gz``."""
    return Path(dataset).name.removesuffix(".gz").removesuffix(".csv")


def resolve_dataset(dataset: str, data_dir: str | Path | None = None) -> tuple[DatasetInfo, Path]:
    """Map a catalogue name (case-insensitive) or a CSV path to its description and file."""
    info = CATALOGUE.get(dataset.lower())
    if info is not None:
        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        return info, root / info.file
    path = Path(dataset)
    if path.suffix in {".csv", ".gz"} or path.exists():
        return DatasetInfo(dataset_stem(dataset), path.name, "", "ratio", date_column=None), path
    known = ", ".join(sorted({i.name for i in CATALOGUE.values()}))
    raise DataError(
        f"unknown dataset {dataset!r}: use one of {known} or a path to a .csv/.csv.gz file"
    )


DEFAULT_ID_COLUMN = "unique_id"


@dataclass(frozen=True)
class Frame:
    """A validated table: timestamps and float values ``[N, C]``.

    A long file's rows are grouped by series (in order of first appearance), each in time order;
    ``series`` maps each id to its rows ``[start, end)``. A wide file is one series, ``{}`` here.
    """

    path: Path
    dates: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...]
    series: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_long(self) -> bool:
        return bool(self.series)


def find_time_column(df: pd.DataFrame, path: Path, skip: Sequence[str] = ()) -> str:
    """``date`` (or ``ds``) when there is one, else the first column whose every cell is a
    timestamp (and not just a number); the error names the columns when none is."""
    for name in ("date", "ds"):
        if name in df.columns and name not in skip:
            return name
    for col in df.columns:
        if col in skip:
            continue
        cells = df[col].str.strip()
        if pd.to_numeric(cells, errors="coerce").notna().all():
            continue  # numbers parse as epoch timestamps; they are values here
        if pd.to_datetime(cells, errors="coerce", format="mixed").notna().all():
            return str(col)
    raise DataError(
        f"{path}: no timestamp column: none of {list(df.columns)} parses as dates and times; "
        "add one or name it with --date-column"
    )


def _step_text(step: np.timedelta64) -> str:
    return str(pd.Timedelta(step))


def check_regular(dates: np.ndarray, rows: np.ndarray, where: str) -> None:
    """Refuse timestamps out of order, duplicated or with a gap, naming the rows (file rows
    ``rows``, 0-based data rows) around the first problem. A calendar frequency (month starts,
    business days) whose steps differ in length counts as regular."""
    if len(dates) < 2:
        return
    diffs = np.diff(dates)
    bad = np.flatnonzero(diffs <= np.timedelta64(0))
    if bad.size:
        i = int(bad[0])
        a, b = int(rows[i]), int(rows[i + 1])
        what = "repeats" if diffs[i] == np.timedelta64(0) else "comes before"
        raise DataError(
            f"{where}: timestamp {pd.Timestamp(dates[i + 1])} at row {b} (line {b + 2}) {what} "
            f"{pd.Timestamp(dates[i])} at row {a} (line {a + 2}); one row per time step, in "
            "time order"
        )
    if (diffs == diffs[0]).all():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas 3 announces a change of infer_freq's return type
        try:
            calendar = pd.infer_freq(pd.DatetimeIndex(dates)) if len(dates) >= 3 else None
        except (TypeError, ValueError):
            calendar = None
    if calendar is not None:
        return
    values, counts = np.unique(diffs, return_counts=True)
    usual = values[int(np.argmax(counts))]
    i = int(np.flatnonzero(diffs != usual)[0])
    a, b = int(rows[i]), int(rows[i + 1])
    missing = diffs[i] / usual - 1
    gap = (
        f"about {missing:.0f} missing row(s)"
        if missing >= 0.5
        else f"a step of {_step_text(diffs[i])}"
    )
    raise DataError(
        f"{where}: gap between row {a} (line {a + 2}, {pd.Timestamp(dates[i])}) and row {b} "
        f"(line {b + 2}, {pd.Timestamp(dates[i + 1])}): {gap} where the usual step is "
        f"{_step_text(usual)}; fill the missing steps (e.g. interpolate) or resample to a "
        "regular step"
    )


def load_frame(path: Path, date_column: str | None = "date", id_column: str | None = None) -> Frame:
    """Read a CSV or CSV.gz and refuse anything the models cannot use, naming file, column, row.

    ``date_column=None`` detects the timestamp column (:func:`find_time_column`). A file with an
    ``id_column`` (default: ``unique_id`` when present) is long: one row per series and time
    step; its rows come back grouped by series, each in time order (:class:`Frame`)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from exc
    if df.empty:
        raise DataError(f"{path}: no data rows")
    if id_column is None and DEFAULT_ID_COLUMN in df.columns:
        id_column = DEFAULT_ID_COLUMN
    if id_column is not None and id_column not in df.columns:
        raise DataError(f"{path}: no id column {id_column!r} (columns: {list(df.columns)})")
    skip = (id_column,) if id_column is not None else ()
    if date_column is None:
        date_column = find_time_column(df, path, skip)
    if date_column not in df.columns:
        raise DataError(f"{path}: no date column {date_column!r} (columns: {list(df.columns)})")

    # Row numbers in messages are 0-based data rows; the file line is row + 2 (header is line 1).
    raw_dates = df[date_column]
    dates = pd.to_datetime(raw_dates, errors="coerce", format="mixed")
    bad = np.flatnonzero(dates.isna().to_numpy())
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: column {date_column!r} row {row} (line {row + 2}): "
            f"cannot parse {raw_dates.iloc[row]!r} as a date"
        )

    value_cols = [c for c in df.columns if c not in (date_column, id_column)]
    numeric: dict[str, np.ndarray] = {}
    non_numeric: list[str] = []
    for col in value_cols:
        cells = df[col].str.strip()
        parsed = pd.to_numeric(cells, errors="coerce")
        spelled_nan = cells.str.lower().isin({"nan", "inf", "-inf"}).any()
        if parsed.isna().all() and not spelled_nan:
            non_numeric.append(col)
            continue
        numeric[col] = parsed.to_numpy(dtype=np.float64)
    if not numeric:
        raise DataError(f"{path}: no numeric columns (columns: {value_cols})")
    if non_numeric:
        hint = (
            f"; a long file names its series id column {DEFAULT_ID_COLUMN!r} (or --id-column)"
            if id_column is None
            else ""
        )
        raise DataError(
            f"{path}: column {non_numeric[0]!r} is not numeric "
            f"(row 0: {df[non_numeric[0]].iloc[0]!r}); remove it or convert it{hint}"
        )
    for col, arr in numeric.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            row = int(bad[0])
            cell = df[col].iloc[row]
            what = "empty" if cell.strip() == "" else f"{cell!r} is not a finite number"
            raise DataError(f"{path}: column {col!r} row {row} (line {row + 2}): value {what}")
    values = np.stack([numeric[c] for c in numeric], axis=1).astype(np.float32)
    stamps = dates.to_numpy(dtype="datetime64[ns]")
    if id_column is None:
        check_regular(stamps, np.arange(len(stamps)), str(path))
        return Frame(path, stamps, values, tuple(numeric))

    ids = df[id_column].str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if empty.size:
        row = int(empty[0])
        raise DataError(f"{path}: column {id_column!r} row {row} (line {row + 2}): empty series id")
    codes, uniques = pd.factorize(ids)  # codes in order of first appearance
    order = np.lexsort((stamps, codes))  # by series, then time (stable: file order on ties)
    sorted_codes = codes[order]
    bounds = np.flatnonzero(np.diff(sorted_codes)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(order)]])
    series: dict[str, tuple[int, int]] = {}
    for code, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        sid = str(uniques[code])
        check_regular(stamps[order[a:b]], order[a:b], f"{path}: series {sid!r}")
        series[sid] = (a, b)
    return Frame(path, stamps[order], values[order], tuple(numeric), series)


def split_borders(rule: SplitRule, n_rows: int, lookback: int) -> dict[str, tuple[int, int]]:
    """Row ranges ``[start, end)`` of each split; val and test reach back ``lookback`` rows."""
    if rule in ("ett_hour", "ett_minute"):
        k = 1 if rule == "ett_hour" else 4
        train_end, val_end, test_end = 12 * 30 * 24 * k, 16 * 30 * 24 * k, 20 * 30 * 24 * k
    else:
        n_train = int(n_rows * 0.7)
        n_test = int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        train_end, val_end, test_end = n_train, n_train + n_val, n_rows
    return {
        "train": (0, train_end),
        "val": (train_end - lookback, val_end),
        "test": (val_end - lookback, test_end),
    }


@dataclass(frozen=True)
class Scaler:
    """Per-channel z-score fit on the train slice only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        mean = values.mean(axis=0, dtype=np.float64)
        std = values.std(axis=0, dtype=np.float64)
        # A constant channel would divide by zero; keep it unscaled instead.
        std = np.where(std < 1e-8, 1.0, std)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((values - self.mean) / self.std).astype(np.float32)
        return out

    def inverse(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        if isinstance(values, torch.Tensor):
            return values * torch.from_numpy(self.std) + torch.from_numpy(self.mean)
        out: np.ndarray = values * self.std + self.mean
        return out


class WindowSet:
    """Stride-1 windows over one split, gathered per batch (no copy of the series per window).

    ``segments`` (a long file's series, stacked in ``series``) are the lengths of consecutive
    independent series: a window lies inside one of them, never across two.
    """

    def __init__(
        self,
        series: np.ndarray,
        lookback: int,
        horizon: int,
        start_row: int,
        segments: Sequence[int] | None = None,
    ) -> None:
        self.series = torch.from_numpy(np.ascontiguousarray(series))  # [T, C]
        self.lookback = lookback
        self.horizon = horizon
        self.start_row = start_row  # row of series[0] in the source file (wide files)
        self.segments = (len(series),) if segments is None else tuple(segments)
        if sum(self.segments) != len(series):
            raise ValueError(f"segments {self.segments} do not add up to {len(series)} rows")
        firsts, offset = [], 0
        for n in self.segments:
            firsts.append(torch.arange(offset, offset + max(n - lookback - horizon + 1, 0)))
            offset += n
        self.starts = torch.cat(firsts)  # [N] first row of each window in ``series``
        self.n_windows = len(self.starts)

    def __len__(self) -> int:
        return self.n_windows

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows starting at ``index``: x ``[B, L, C]`` and y ``[B, H, C]``."""
        span = torch.arange(self.lookback + self.horizon)
        rows = self.starts[index][:, None] + span[None, :]  # [B, L + H]
        window = self.series[rows]  # [B, L + H, C]
        return window[:, : self.lookback], window[:, self.lookback :]

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Index batches covering every window once; the last one is kept even when short."""
        order = (
            torch.randperm(self.n_windows, generator=generator)
            if shuffle
            else torch.arange(self.n_windows)
        )
        return list(order.split(batch_size))


@dataclass
class PreparedData:
    info: DatasetInfo
    config: DataConfig
    path: Path
    columns: tuple[str, ...]
    scaler: Scaler
    borders: dict[str, tuple[int, int]]
    splits: dict[str, WindowSet] = field(default_factory=dict)
    dates: np.ndarray | None = None
    values: np.ndarray | None = None
    """Raw values ``[N, C]`` of the used columns (a long file's grouped by series)."""
    series: dict[str, tuple[int, int]] = field(default_factory=dict)
    """A long file's series: id -> rows ``[start, end)`` of ``values``; ``{}`` when wide."""
    series_borders: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """A long file's split borders per series, rows within the series."""

    @property
    def channels(self) -> int:
        return len(self.columns)

    def describe(self) -> dict[str, object]:
        """What a manifest records about the data a model was trained on."""
        return {
            "name": self.info.name,
            "file": self.path.name,
            "features": self.config.features,
            "columns": list(self.columns),
            "split_rule": self.info.split,
            "layout": "long" if self.series else "wide",
            "series": max(len(self.series), 1),
            "borders": {k: list(v) for k, v in self.borders.items()},
            "windows": {k: len(v) for k, v in self.splits.items()},
            "frequency": self.info.freq,
            "scaler": {"mean": self.scaler.mean.tolist(), "std": self.scaler.std.tolist()},
        }


def select_features(
    frame: Frame, cfg: DataConfig, info: DatasetInfo
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The values and columns a model uses: every column (``M``) or the target only (``S``)."""
    values, columns = frame.values, frame.columns
    if cfg.features == "S":
        target = cfg.target or info.target
        if target not in columns:
            target = columns[-1] if cfg.target is None else target
        if target not in columns:
            raise DataError(
                f"{frame.path}: target column {target!r} not found (columns: {list(columns)})"
            )
        idx = columns.index(target)
        return values[:, idx : idx + 1], (target,)
    if cfg.features != "M":
        raise DataError(f"features must be 'M' or 'S', got {cfg.features!r}")
    return values, columns


def prepare(cfg: DataConfig) -> PreparedData:
    """Load, validate, split, scale (train statistics) and window a dataset."""
    if cfg.lookback < 1 or cfg.horizon < 1:
        raise DataError(
            f"lookback and horizon must be positive (got {cfg.lookback}, {cfg.horizon})"
        )
    info, path = resolve_dataset(cfg.dataset, cfg.data_dir)
    frame = load_frame(path, cfg.date_column or info.date_column, cfg.id_column)
    values, columns = select_features(frame, cfg, info)
    if frame.is_long:
        data = _prepare_long(cfg, info, path, frame, values, columns)
    else:
        n_rows = len(values)
        borders = _checked_borders(info.split, n_rows, cfg, str(path))
        train_start, train_end = borders["train"]
        scaler = Scaler.fit(values[train_start:train_end])
        scaled = scaler.transform(values)
        data = PreparedData(
            info, cfg, path, columns, scaler, borders, dates=frame.dates, values=values
        )
        for name, (start, end) in borders.items():
            data.splits[name] = WindowSet(scaled[start:end], cfg.lookback, cfg.horizon, start)
    log.info(
        "%s: %d rows x %d channels%s, windows %s",
        info.name,
        len(values),
        len(columns),
        f" in {len(frame.series)} series" if frame.is_long else "",
        {k: len(v) for k, v in data.splits.items()},
    )
    return data


def _checked_borders(
    rule: SplitRule, n_rows: int, cfg: DataConfig, where: str
) -> dict[str, tuple[int, int]]:
    borders = split_borders(rule, n_rows, cfg.lookback)
    need = cfg.lookback + cfg.horizon
    for name, (start, end) in borders.items():
        if start < 0 or end > n_rows or end - start < need:
            raise DataError(
                f"{where}: {n_rows} rows are too few for lookback {cfg.lookback} + horizon "
                f"{cfg.horizon}: the {name} split rows [{start}, {end}) need at least {need} rows"
            )
    return borders


def _prepare_long(
    cfg: DataConfig,
    info: DatasetInfo,
    path: Path,
    frame: Frame,
    values: np.ndarray,
    columns: tuple[str, ...],
) -> PreparedData:
    """Split each series on its own (same rule), fit the scaler on the union of the train
    slices, and stack each split's slices with their lengths as segments."""
    per_series = {
        sid: _checked_borders(info.split, end - start, cfg, f"{path}: series {sid!r}")
        for sid, (start, end) in frame.series.items()
    }
    firsts = {sid: start for sid, (start, _) in frame.series.items()}
    train = np.concatenate(
        [
            values[firsts[sid] + b["train"][0] : firsts[sid] + b["train"][1]]
            for sid, b in per_series.items()
        ]
    )
    scaler = Scaler.fit(train)
    scaled = scaler.transform(values)
    data = PreparedData(
        info,
        cfg,
        path,
        columns,
        scaler,
        {},
        dates=frame.dates,
        values=values,
        series=dict(frame.series),
        series_borders=per_series,
    )
    for name in SPLITS:
        slices = [
            scaled[firsts[sid] + b[name][0] : firsts[sid] + b[name][1]]
            for sid, b in per_series.items()
        ]
        data.splits[name] = WindowSet(
            np.concatenate(slices), cfg.lookback, cfg.horizon, 0, [len(x) for x in slices]
        )
    return data


def infer_step(dates: np.ndarray) -> float:
    """Median spacing of timestamps in seconds (for manifests and forecast timestamps)."""
    if len(dates) < 2:
        return math.nan
    diffs = np.diff(dates.astype("datetime64[s]").astype(np.int64))
    return float(np.median(diffs))
