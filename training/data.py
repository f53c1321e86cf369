"""Real-data loading with the standard long-term forecasting protocol.

The protocol (see docs and ``../shared/papers/METHODS.md``): channels z-scored with a scaler fit on
the train slice only, stride-1 windows, and fixed split borders per dataset family:

* ETT hourly: train ``[0, 8640)``, val ``[8640 - L, 11520)``, test ``[11520 - L, 14400)``;
* ETT 15-minute: the same borders times 4;
* anything else (including a user's own CSV): 70/10/20 with the val/test slices reaching back L rows
  so that their first window's forecast starts right after the previous split.
"""

from __future__ import annotations

import logging
import math
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


@dataclass(frozen=True)
class Frame:
    """A validated table: timestamps and float values ``[N, C]``."""

    path: Path
    dates: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...]


def find_time_column(df: pd.DataFrame, path: Path) -> str:
    """``date`` when there is one, else the first column whose every cell is a timestamp (and
    not just a number); the error names the columns when none is."""
    if "date" in df.columns:
        return "date"
    for col in df.columns:
        cells = df[col].str.strip()
        if pd.to_numeric(cells, errors="coerce").notna().all():
            continue  # numbers parse as epoch timestamps; they are values here
        if pd.to_datetime(cells, errors="coerce", format="mixed").notna().all():
            return str(col)
    raise DataError(
        f"{path}: no timestamp column: none of {list(df.columns)} parses as dates and times; "
        "add one or name it with --date-column"
    )


def load_frame(path: Path, date_column: str | None = "date") -> Frame:
    """Read a CSV or CSV.gz and refuse anything the models cannot use, naming file, column, row.

    ``date_column=None`` detects the timestamp column (:func:`find_time_column`)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from exc
    if df.empty:
        raise DataError(f"{path}: no data rows")
    if date_column is None:
        date_column = find_time_column(df, path)
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

    value_cols = [c for c in df.columns if c != date_column]
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
        raise DataError(
            f"{path}: column {non_numeric[0]!r} is not numeric "
            f"(row 0: {df[non_numeric[0]].iloc[0]!r}); remove it or convert it"
        )
    for col, arr in numeric.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            row = int(bad[0])
            cell = df[col].iloc[row]
            what = "empty" if cell.strip() == "" else f"{cell!r} is not a finite number"
            raise DataError(f"{path}: column {col!r} row {row} (line {row + 2}): value {what}")
    values = np.stack([numeric[c] for c in numeric], axis=1).astype(np.float32)
    return Frame(path, dates.to_numpy(), values, tuple(numeric))


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
    """Stride-1 windows over one split, gathered per batch (no copy of the series per window)."""

    def __init__(self, series: np.ndarray, lookback: int, horizon: int, start_row: int) -> None:
        self.series = torch.from_numpy(np.ascontiguousarray(series))  # [T, C]
        self.lookback = lookback
        self.horizon = horizon
        self.start_row = start_row  # row of series[0] in the source file
        self.n_windows = len(series) - lookback - horizon + 1

    def __len__(self) -> int:
        return self.n_windows

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows starting at ``index``: x ``[B, L, C]`` and y ``[B, H, C]``."""
        span = torch.arange(self.lookback + self.horizon)
        rows = index[:, None] + span[None, :]  # [B, L + H]
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
            "borders": {k: list(v) for k, v in self.borders.items()},
            "windows": {k: len(v) for k, v in self.splits.items()},
            "frequency": self.info.freq,
            "scaler": {"mean": self.scaler.mean.tolist(), "std": self.scaler.std.tolist()},
        }


def prepare(cfg: DataConfig) -> PreparedData:
    """Load, validate, split, scale (train statistics) and window a dataset."""
    if cfg.lookback < 1 or cfg.horizon < 1:
        raise DataError(
            f"lookback and horizon must be positive (got {cfg.lookback}, {cfg.horizon})"
        )
    info, path = resolve_dataset(cfg.dataset, cfg.data_dir)
    frame = load_frame(path, cfg.date_column or info.date_column)
    values, columns = frame.values, frame.columns
    if cfg.features == "S":
        target = cfg.target or info.target
        if target not in columns:
            target = columns[-1] if cfg.target is None else target
        if target not in columns:
            raise DataError(
                f"{path}: target column {target!r} not found (columns: {list(columns)})"
            )
        idx = columns.index(target)
        values, columns = values[:, idx : idx + 1], (target,)
    elif cfg.features != "M":
        raise DataError(f"features must be 'M' or 'S', got {cfg.features!r}")

    n_rows = len(values)
    borders = split_borders(info.split, n_rows, cfg.lookback)
    need = cfg.lookback + cfg.horizon
    for name, (start, end) in borders.items():
        if start < 0 or end > n_rows or end - start < need:
            raise DataError(
                f"{path}: {n_rows} rows are too few for lookback {cfg.lookback} + horizon "
                f"{cfg.horizon}: the {name} split rows [{start}, {end}) need at least {need} rows"
            )
    train_start, train_end = borders["train"]
    scaler = Scaler.fit(values[train_start:train_end])
    scaled = scaler.transform(values)
    data = PreparedData(info, cfg, path, columns, scaler, borders, dates=frame.dates)
    for name, (start, end) in borders.items():
        data.splits[name] = WindowSet(scaled[start:end], cfg.lookback, cfg.horizon, start)
    log.info(
        "%s: %d rows x %d channels, windows %s",
        info.name,
        n_rows,
        len(columns),
        {k: len(v) for k, v in data.splits.items()},
    )
    return data


def infer_step(dates: np.ndarray) -> float:
    """Median spacing of timestamps in seconds (for manifests and forecast timestamps)."""
    if len(dates) < 2:
        return math.nan
    diffs = np.diff(dates.astype("datetime64[s]").astype(np.int64))
    return float(np.median(diffs))
