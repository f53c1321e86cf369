"""The real-data protocol on the bundled files, and every bad-data case refused by name."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from training.data import DEFAULT_DATA_DIR, DataConfig, DataError, prepare, split_borders


@pytest.fixture(scope="module")
def etth1() -> object:
    return prepare(DataConfig("ETTh1", lookback=336, horizon=96))


def test_etth1_window_counts_are_the_standard_ones(etth1) -> None:
    counts = {k: len(v) for k, v in etth1.splits.items()}
    assert counts == {"train": 8209, "val": 2785, "test": 2785}


def test_scaler_statistics_are_the_train_slice_only(etth1) -> None:
    raw = pd.read_csv(DEFAULT_DATA_DIR / "ETTh1.csv").iloc[:, 1:].to_numpy(np.float64)
    np.testing.assert_allclose(etth1.scaler.mean, raw[:8640].mean(0), rtol=1e-5)
    np.testing.assert_allclose(etth1.scaler.std, raw[:8640].std(0), rtol=1e-5)
    assert not np.allclose(etth1.scaler.mean, raw[:14400].mean(0), rtol=1e-3)


def test_no_test_row_reaches_training(etth1) -> None:
    train, test = etth1.splits["train"], etth1.splits["test"]
    last_train_row = train.start_row + len(train) - 1 + train.lookback + train.horizon - 1
    first_test_target_row = test.start_row + test.lookback
    assert last_train_row < 8640 <= 11520 == first_test_target_row
    # The last training target is the row just before the validation targets start.
    x, y = train.batch(torch.tensor([len(train) - 1]))
    raw = pd.read_csv(DEFAULT_DATA_DIR / "ETTh1.csv").iloc[:, 1:].to_numpy(np.float32)
    expected = etth1.scaler.transform(raw[8640 - 96 : 8640])
    np.testing.assert_allclose(y[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_windows_are_stride_one_and_aligned(etth1) -> None:
    val = etth1.splits["val"]
    x0, y0 = val.batch(torch.tensor([0]))
    x1, _ = val.batch(torch.tensor([1]))
    assert torch.equal(x0[0, 1:], x1[0, :-1])
    assert x0.shape == (1, 336, 7) and y0.shape == (1, 96, 7)


def test_every_batch_kept_no_dropped_last(etth1) -> None:
    batches = etth1.splits["test"].batches(512)
    assert sum(len(b) for b in batches) == 2785 and len(batches[-1]) == 2785 % 512


@pytest.mark.parametrize("name", ["ETTh2", "ETTm1", "exchange_rate", "national_illness"])
def test_catalogue_datasets_load(name: str) -> None:
    lookback = 36 if name == "national_illness" else 96
    data = prepare(DataConfig(name, lookback=lookback, horizon=24))
    assert all(len(s) > 0 for s in data.splits.values())


def test_ettm1_borders_are_four_times_hourly() -> None:
    assert split_borders("ett_minute", 69680, 96)["test"] == (46080 - 96, 57600)


def test_ratio_rule_matches_protocol() -> None:
    n, lookback = 7588, 96
    b = split_borders("ratio", n, lookback)
    n_train, n_test = int(0.7 * n), int(0.2 * n)
    assert b["train"] == (0, n_train)
    assert b["val"] == (n_train - lookback, n - n_test)
    assert b["test"] == (n - n_test - lookback, n)


def test_univariate_target(etth1) -> None:
    data = prepare(DataConfig("ETTh1", lookback=96, horizon=24, features="S"))
    assert data.columns == ("OT",) and data.channels == 1


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _series_csv(rows: int, extra: str = "") -> str:
    dates = pd.date_range("2020-01-01", periods=rows, freq="h")
    lines = ["date,a,b" + extra] + [f"{d},{i % 7},{i % 5}" for i, d in enumerate(dates)]
    return "\n".join(lines) + "\n"


def test_users_own_csv_uses_the_70_10_20_rule(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", _series_csv(400))
    data = prepare(DataConfig(str(path), lookback=24, horizon=12))
    assert data.borders == {"train": (0, 280), "val": (256, 320), "test": (296, 400)}
    assert data.columns == ("a", "b")


def test_gzip_csv(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv.gz"
    path.write_bytes(gzip.compress(_series_csv(300).encode()))
    assert prepare(DataConfig(str(path), lookback=24, horizon=12)).channels == 2


def test_data_dir_override(tmp_path: Path) -> None:
    _write(tmp_path / "ETTh1.csv", _series_csv(20000))
    data = prepare(DataConfig("ETTh1", lookback=96, horizon=24, data_dir=str(tmp_path)))
    assert data.path == tmp_path / "ETTh1.csv" and data.columns == ("a", "b")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"missing\.csv: file not found"),
        ("date,name\n2020-01-01,x\n2020-01-02,y\n", r"no numeric columns"),
        ("date,a\n2020-01-01,1\n2020-01-02,nan\n", r"column 'a' row 1 \(line 3\): value 'nan'"),
        ("date,a\n2020-01-01,1\n2020-01-02,inf\n", r"column 'a' row 1 \(line 3\).*'inf'"),
        ("date,a\n2020-01-01,1\n2020-01-02,\n", r"column 'a' row 1 \(line 3\): value empty"),
        ("date,a\n2020-01-01,1\n2020-01-02,abc\n", r"column 'a' row 1 .*'abc'"),
        ("date,a\n2020-01-01,1\nnot-a-date,2\n", r"column 'date' row 1 .*'not-a-date'"),
        ("stamp,a\nsoon,1\n", r"no timestamp column: none of \['stamp', 'a'\]"),
    ],
)
def test_bad_data_is_refused_naming_file_column_row(
    tmp_path: Path, content: str | None, match: str
) -> None:
    path = tmp_path / "missing.csv" if content is None else _write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=match) as info:
        prepare(DataConfig(str(path), lookback=4, horizon=2))
    assert str(path) in str(info.value)


def test_too_few_rows_for_lookback_plus_horizon(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.csv", _series_csv(100))
    with pytest.raises(DataError, match=r"100 rows are too few for lookback 96 \+ horizon 24"):
        prepare(DataConfig(str(path), lookback=96, horizon=24))


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        prepare(DataConfig("nope"))


# -- long files: one row per series and time step ------------------------------------------------


def _long_csv(path: Path, lengths: dict[str, int], start: str = "2024-01-01") -> Path:
    """Series k's values are k * 1000 + t (channel a) and -(k * 1000 + t) (channel b), rows
    shuffled, so a window's series is readable from its values."""
    rows = []
    for k, (sid, n) in enumerate(lengths.items()):
        stamps = pd.date_range(start, periods=n, freq="h")
        for t, ds in enumerate(stamps):
            rows.append({"unique_id": sid, "ds": ds, "a": k * 1000 + t, "b": -(k * 1000 + t)})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    frame.to_csv(path, index=False)
    return path


LONG = {"north": 300, "south": 200, "east": 250}


def test_long_file_splits_each_series_chronologically_70_10_20(tmp_path: Path) -> None:
    L, H = 24, 12
    data = prepare(DataConfig(str(_long_csv(tmp_path / "long.csv", LONG)), lookback=L, horizon=H))
    assert data.columns == ("a", "b") and set(data.series) == set(LONG)  # first appearance
    assert data.describe()["layout"] == "long" and data.describe()["series"] == 3
    for sid, n in LONG.items():
        assert data.series_borders[sid] == split_borders("ratio", n, L)
    for name, windows in data.splits.items():
        expected = sum(b - a - L - H + 1 for a, b in (data.series_borders[s][name] for s in LONG))
        assert len(windows) == expected, name
    # The scaler is fit on the union of the train slices only.
    train_a = np.concatenate(
        [k * 1000 + np.arange(int(n * 0.7)) for k, n in enumerate(LONG.values())]
    )
    np.testing.assert_allclose(data.scaler.mean[0], train_a.mean(), rtol=1e-5)
    np.testing.assert_allclose(data.scaler.std[0], train_a.std(), rtol=1e-5)


def test_long_windows_never_cross_series_and_stay_in_their_split(tmp_path: Path) -> None:
    L, H = 24, 12
    data = prepare(DataConfig(str(_long_csv(tmp_path / "long.csv", LONG)), lookback=L, horizon=H))
    for name, windows in data.splits.items():
        x, y = windows.batch(torch.arange(len(windows)))
        raw = data.scaler.inverse(torch.cat([x, y], dim=1)).numpy()[..., 0]  # [N, L + H]
        raw = np.rint(raw).astype(np.int64)
        series, t = raw // 1000, raw % 1000
        assert (series == series[:, :1]).all(), f"{name}: a window crosses two series"
        assert (np.diff(t, axis=1) == 1).all(), f"{name}: a window is not consecutive"
        for k, sid in enumerate(LONG):
            mine = series[:, 0] == k
            first_target = t[mine, L]
            a, b = data.series_borders[sid][name]
            assert first_target.min() == a + L and t[mine, -1].max() == b - 1
    # The test targets start right after the validation targets, per series.
    assert data.series_borders["south"]["test"][0] + L == data.series_borders["south"]["val"][1]


def test_long_file_with_another_id_column_name(tmp_path: Path) -> None:
    path = _long_csv(tmp_path / "long.csv", {"x": 100, "y": 100})
    path.write_text(path.read_text().replace("unique_id", "store", 1))
    with pytest.raises(DataError, match=r"column 'store' is not numeric.*'unique_id'"):
        prepare(DataConfig(str(path), lookback=8, horizon=4))
    data = prepare(DataConfig(str(path), lookback=8, horizon=4, id_column="store"))
    assert set(data.series) == {"x", "y"}
    with pytest.raises(DataError, match=r"no id column 'shop'"):
        prepare(DataConfig(str(path), lookback=8, horizon=4, id_column="shop"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        # No timestamp column at all.
        ("unique_id,a\ns1,1\ns1,2\n", r"no timestamp column: none of \['unique_id', 'a'\]"),
        # A non-numeric value column.
        ("date,a,city\n2020-01-01,1,Oslo\n2020-01-02,2,Bergen\n", r"column 'city' is not numeric"),
        # A gap (one missing hour) in a wide file.
        (
            "date,a\n2020-01-01 00:00,1\n2020-01-01 01:00,2\n2020-01-01 03:00,3\n"
            "2020-01-01 04:00,4\n",
            r"gap between row 1 \(line 3, 2020-01-01 01:00:00\) and row 2 \(line 4, "
            r"2020-01-01 03:00:00\): about 1 missing row\(s\) where the usual step is 0 days 01:00",
        ),
        # Rows out of time order, and a repeated timestamp.
        (
            "date,a\n2020-01-02,1\n2020-01-01,2\n",
            r"2020-01-01 00:00:00 at row 1 \(line 3\) comes before",
        ),
        ("date,a\n2020-01-01,1\n2020-01-01,2\n", r"at row 1 \(line 3\) repeats"),
        # A gap inside one series of a long file names the series and its rows in the file.
        (
            "unique_id,ds,a\nx,2020-01-01,1\ny,2020-01-01,1\nx,2020-01-02,2\ny,2020-01-03,2\n"
            "x,2020-01-03,3\ny,2020-01-04,3\ny,2020-01-05,4\n",
            r"series 'y': gap between row 1 \(line 3, 2020-01-01 00:00:00\) and row 3 \(line 5",
        ),
        (
            "unique_id,ds,a\n,2020-01-01,1\n",
            r"column 'unique_id' row 0 \(line 2\): empty series id",
        ),
    ],
)
def test_own_data_problems_are_named(tmp_path: Path, content: str, match: str) -> None:
    path = _write(tmp_path / "mine.csv", content)
    with pytest.raises(DataError, match=match) as info:
        prepare(DataConfig(str(path), lookback=4, horizon=2))
    assert str(path) in str(info.value)


def test_calendar_frequencies_are_regular(tmp_path: Path) -> None:
    months = pd.date_range("2015-01-01", periods=120, freq="MS")
    path = _write(
        tmp_path / "monthly.csv", "date,a\n" + "".join(f"{d},{i}\n" for i, d in enumerate(months))
    )
    assert prepare(DataConfig(str(path), lookback=12, horizon=3)).channels == 1


def test_a_long_series_too_short_is_named(tmp_path: Path) -> None:
    path = _long_csv(tmp_path / "long.csv", {"big": 400, "tiny": 60})
    with pytest.raises(
        DataError, match=r"series 'tiny': 60 rows are too few for lookback 24 \+ horizon 12"
    ):
        prepare(DataConfig(str(path), lookback=24, horizon=12))
