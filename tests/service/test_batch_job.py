"""`python -m service.batch_job` on a small local Ray (2 CPUs) with series cut from ETTh1.

The job and POST /v1/forecast/batch (real HTTP through uvicorn) must give identical forecasts,
intervals and timestamps for the same series; bad series land in the errors file with a reason.
Ray starts once for the module.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from models_registry.store import FilesystemStore
from service.batch import JobError
from service.batch.inputs import (
    build_windows,
    colocated_row_groups,
    inspect_input,
    parquet_row_groups,
    read_row_groups,
    tail_rows,
)
from service.batch.scoring import Scorer, ScoreSpec
from service.batch_job import main
from service.core.engine import EngineOptions
from tests.service.conftest import FIXED, Served, serving
from tests.service.onnx_models import build_family, linear_bytes, manifest, mlp_bytes
from tests.strict import require_module

ray = require_module("ray")

pytestmark = [
    pytest.mark.slow,
    # Ray Data itself reads its deprecated settings when it ships its context to the workers.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

ROOT = Path(__file__).resolve().parents[2]
ETTH1 = ROOT / "data" / "ETTh1.csv"
NAME = "etth1-h96"
LOOKBACK, HORIZON = 32, 8
CHANNELS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
CPU_ONLY = EngineOptions(providers=("CPUExecutionProvider",))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student MLP (so the forecasts are not trivial), its teacher ensemble, a 7-channel model."""
    root = tmp_path_factory.mktemp("batch-registry")
    store = FilesystemStore(root)
    build_family(store, NAME, LOOKBACK, HORIZON, student=mlp_bytes(LOOKBACK, HORIZON, hidden=64))
    fixed = store.register(
        manifest(FIXED, "student", LOOKBACK, HORIZON, architecture="last-value", channels=7),
        linear_bytes(LOOKBACK, HORIZON, channels=7),
    )
    store.set_alias(FIXED, "production", fixed.version)
    return root


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(registry: Path) -> Iterator[Served]:
    with serving(registry_root=registry) as served:
        yield served


@pytest.fixture(scope="module")
def etth1() -> pa.Table:
    opts = pacsv.ConvertOptions(column_types={"date": pa.timestamp("s")})
    return pacsv.read_csv(ETTH1, convert_options=opts)


def _rows(table: pa.Table, start: int, n: int) -> tuple[list[datetime], np.ndarray]:
    part = table.slice(start, n)
    values = np.column_stack([part[c].to_numpy() for c in CHANNELS])
    return part["date"].to_pylist(), values


def _endpoint(served: Served, series: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """POST /v1/forecast/batch (row form), msgpack answer: id -> forecast (float32 arrays)."""
    with served.client() as client:
        r = client.post("/v1/forecast/batch", json={"model": NAME, "series": series, **options},
                        headers={"Accept": "application/msgpack"})
    assert r.status_code == 200, r.text
    return {f["id"]: f for f in msgspec.msgpack.decode(r.content)["forecasts"]}


def _f32(b: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(b, "<f4").reshape(shape)


def _read_output(path: Path) -> dict[str, pa.Table]:
    table = pq.read_table(path).sort_by([("unique_id", "ascending"), ("ds", "ascending")])
    ids = table["unique_id"].to_pylist()
    out: dict[str, pa.Table] = {}
    for uid in dict.fromkeys(ids):
        start = ids.index(uid)
        out[uid] = table.slice(start, ids.count(uid))
    return out


def _errors(path: Path) -> dict[Any, str]:
    table = pq.read_table(path)
    return dict(zip(table["unique_id"].to_pylist(), table["reason"].to_pylist(), strict=True))


def _stamps(values: list[Any]) -> list[datetime]:
    return [v if isinstance(v, datetime) else datetime.fromisoformat(v) for v in values]


# -- long layout, fast, intervals -----------------------------------------------------------------


@pytest.mark.parametrize("order", ["shuffled", "sorted_by_id"])
def test_long_parquet_matches_the_batch_endpoint(
    local_ray: None, registry: Path, server: Served, etth1: pa.Table, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], order: str,
) -> None:
    """Rows in any order go through the shuffle; a file sorted by id (rows of a series in any
    time order, row groups cutting series) is read without one. Same forecasts either way."""
    rng = np.random.default_rng(0)
    series: dict[str, tuple[list[datetime], np.ndarray]] = {}
    for k in range(120):  # windows of every length from the lookback to lookback + 9
        series[f"s{k:03d}"] = _rows(etth1, k * 97, LOOKBACK + k % 10)
    stamps, values = _rows(etth1, 5000, LOOKBACK + 6)
    values[1, 6] = np.nan  # before the window: the job never reads it
    series["nan-before-window"] = (stamps, values)
    stamps, values = _rows(etth1, 6000, LOOKBACK + 3)
    values[-4, 2] = np.nan
    series["nan-in-window"] = (stamps, values)
    series["short"] = _rows(etth1, 7000, LOOKBACK - 12)
    stamps, values = _rows(etth1, 8000, LOOKBACK + 2)
    series["duplicate-ds"] = (stamps[:-1] + [stamps[-2]], values)
    ids = [uid for uid, (s, _) in series.items() for _ in s]
    rows = np.concatenate([v for _, v in series.values()])
    table = pa.table({
        "unique_id": ids,
        "ds": pa.array([t for s, _ in series.values() for t in s], pa.timestamp("us")),
        **{c: rows[:, j] for j, c in enumerate(CHANNELS)},
    }).take(rng.permutation(len(ids)))  # the job must not rely on the input order
    if order == "sorted_by_id":
        table = table.take(pc.sort_indices(table, [("unique_id", "ascending")]))  # stable
    src = tmp_path / "series.parquet"
    pq.write_table(table, src, row_group_size=700)
    spec = inspect_input(str(src))
    reads = colocated_row_groups(parquet_row_groups(spec), spec)
    assert (reads is not None) == (order == "sorted_by_id")
    out, errors = tmp_path / "forecasts", tmp_path / "errors.parquet"

    code = main(["--model", NAME, "--mode", "fast", "--input", str(src), "--output", str(out),
                 "--errors", str(errors), "--registry", str(registry), "--level", "80",
                 "--level", "95", "--batch-size", "50", "--no-progress"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "121 series scored, 3 failed" in summary and "series/s" in summary

    failures = _errors(errors)
    assert set(failures) == {"nan-in-window", "short", "duplicate-ds"}
    assert "non-finite MUFL at ds" in failures["nan-in-window"]
    assert failures["duplicate-ds"].startswith("duplicate ds")

    body = []
    for uid, (s, v) in series.items():
        if uid == "nan-before-window":  # the endpoint checks every value it is sent
            s, v = s[-LOOKBACK:], v[-LOOKBACK:]
        if uid in ("nan-in-window", "duplicate-ds"):
            continue
        body.append({"id": uid, "values": v.tolist(),
                     "timestamps": [t.isoformat() for t in s]})
    answers = _endpoint(server, body, level=[80, 95])
    # The same refusal, word for word, for a series shorter than the lookback.
    assert answers["short"]["error"]["message"] == failures["short"]

    got = _read_output(out)
    assert len(got) == 121
    for uid, rows_ in got.items():
        answer = answers[uid]
        expected = _f32(answer["values"], (HORIZON, 7))
        actual = np.column_stack([rows_[c].to_numpy() for c in CHANNELS])
        assert np.array_equal(actual, expected), uid
        for level in ("80", "95"):
            band = answer["intervals"][level]
            for side, key in (("lo", "lower"), ("hi", "upper")):
                actual = np.column_stack([rows_[f"{c}-{side}-{level}"].to_numpy()
                                          for c in CHANNELS])
                assert np.array_equal(actual, _f32(band[key], (HORIZON, 7))), (uid, level)
        assert rows_["ds"].to_pylist() == _stamps(answer["timestamps"]), uid


# -- wide layout, accurate (teacher ensemble), two actors ----------------------------------------


def test_wide_csv_accurate_matches_the_batch_endpoint(
    local_ray: None, registry: Path, server: Served, etth1: pa.Table, tmp_path: Path,
) -> None:
    n = LOOKBACK + 20
    stamps, _ = _rows(etth1, 10_000, n)
    columns: dict[str, np.ndarray] = {}
    for k in range(24):
        channel = CHANNELS[k % 7]
        columns[f"{channel}_{k}"] = etth1[channel].to_numpy()[k * 300 : k * 300 + n]
    late = etth1["OT"].to_numpy()[:n].copy()
    late[:15] = np.nan  # starts 15 steps after the others: 37 points, enough
    columns["late_start"] = late
    gap = etth1["HUFL"].to_numpy()[:n].copy()
    gap[-5] = np.nan
    columns["gap"] = gap
    young = etth1["LULL"].to_numpy()[:n].copy()
    young[: n - 10] = np.nan
    columns["young"] = young
    src = tmp_path / "wide.csv"
    text = ["date," + ",".join(columns)]
    for i, t in enumerate(stamps):
        cells = ["" if np.isnan(v[i]) else repr(float(v[i])) for v in columns.values()]
        text.append(f"{t:%Y-%m-%d %H:%M:%S}," + ",".join(cells))
    src.write_text("\n".join(text) + "\n")
    out, errors = tmp_path / "forecasts.parquet", tmp_path / "errors.csv"

    code = main(["--model", NAME, "--mode", "accurate", "--input", str(src), "--output",
                 str(out), "--errors", str(errors), "--registry", str(registry), "--level", "90",
                 "--actors", "2", "--cpus-per-actor", "0.5", "--batch-size", "8",
                 "--no-progress"])
    assert code == 0
    failures = pacsv.read_csv(errors).to_pydict()
    reasons = dict(zip(failures["unique_id"], failures["reason"], strict=True))
    assert set(reasons) == {"gap", "young"}
    assert "at ds 2017-" in reasons["gap"]
    assert reasons["young"].startswith("10 points") and "lookback 32" in reasons["young"]

    body = []
    for name, v in columns.items():
        if name in reasons:
            continue
        keep = ~np.isnan(v)
        body.append({"id": name, "values": v[keep].tolist(),
                     "timestamps": [f"{t:%Y-%m-%d %H:%M:%S}"
                                    for t, k in zip(stamps, keep, strict=True) if k]})
    answers = _endpoint(server, body, mode="accurate", level=[90])
    got = _read_output(out)
    assert set(got) == set(answers)
    for uid, rows_ in got.items():
        answer = answers[uid]
        assert np.array_equal(rows_["y"].to_numpy(), _f32(answer["values"], (HORIZON,))), uid
        band = answer["intervals"]["90"]
        assert np.array_equal(rows_["y-lo-90"].to_numpy(), _f32(band["lower"], (HORIZON,)))
        assert np.array_equal(rows_["y-hi-90"].to_numpy(), _f32(band["upper"], (HORIZON,)))
        assert rows_["ds"].to_pylist() == _stamps(answer["timestamps"]), uid


# -- pieces without Ray ---------------------------------------------------------------------------


def test_windows_are_the_last_lookback_rows_and_failures_have_reasons() -> None:
    ids = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 3
    ds = [5, 1, 3, 2, 4] + [1, 2, 3] + [1, 2, 2, 3] + [1, 2, 3]
    x = [5.0, 1, 3, 2, 4] + [1.0, 2, 3] + [1.0, 2, 3, 4] + [np.nan, 2, 3]
    table = pa.table({"unique_id": ids, "ds": pa.array(ds, pa.int64()), "x": x})
    w = build_windows(table, id_col="unique_id", time_col="ds", value_cols=("x",),
                      time_type=pa.int64(), id_type=pa.string(), lookback=3).to_pydict()
    assert w["unique_id"] == ["a", "b", "c", "d"]
    assert w["values"][0] == [3.0, 4.0, 5.0] and w["last"][0] == 5 and w["step"][0] == 1
    assert w["reason"][:2] == [None, None]
    assert w["reason"][2] == "duplicate ds 2"
    assert w["values"][3] == [2.0, 3.0] and w["reason"][3] is None  # leading gap dropped


def test_dropping_rows_before_the_shuffle_changes_no_window() -> None:
    """`tail_rows` on each block (here: time ranges, like daily files, rows shuffled inside),
    then `build_windows` on what is left, gives the windows and reasons of `build_windows` on
    every row."""
    rng = np.random.default_rng(3)
    lookback = 6
    kw = {"id_col": "unique_id", "time_col": "ds", "value_cols": ("a", "b")}
    for _ in range(30):
        lengths = rng.integers(1, 40, 12)
        ids = np.repeat([f"s{i}" for i in range(len(lengths))], lengths)
        ds = np.concatenate([np.arange(k) for k in lengths])
        values = rng.normal(size=(len(ids), 2))
        values[rng.random(values.shape) < 0.15] = np.nan  # gaps, late starts, holes in windows
        table = pa.table({"unique_id": ids, "ds": ds, "a": values[:, 0], "b": values[:, 1]})
        cuts = np.sort(rng.choice(np.arange(1, 40), 3, replace=False))
        blocks = []
        for a, b in zip([0, *cuts], [*cuts, 40], strict=True):
            part = table.filter(pc.and_(pc.greater_equal(table["ds"], a),
                                        pc.less(table["ds"], b)))
            blocks.append(part.take(rng.permutation(part.num_rows)))
        kept = pa.concat_tables([tail_rows(b, lookback=lookback, **kw) for b in blocks])
        assert kept.num_rows < table.num_rows
        full, trimmed = (
            build_windows(t, time_type=pa.int64(), id_type=pa.string(), lookback=lookback, **kw)
            for t in (table, kept)
        )
        for key in ("unique_id", "last", "step", "reason"):
            assert trimmed[key].to_pylist() == full[key].to_pylist()
        for a, b in zip(trimmed["values"].to_pylist(), full["values"].to_pylist(), strict=True):
            assert np.array_equal(a, b, equal_nan=True)


def test_a_fixed_channel_model_refuses_other_channel_counts(registry: Path) -> None:
    spec = ScoreSpec(str(registry), FIXED, 1, "fast", HORIZON, (), ("a", "b", "c"), pa.string(),
                     pa.int64(), CPU_ONLY)
    windows = pa.table({
        "unique_id": ["x"], "n": [LOOKBACK],
        "values": pa.array([[1.0] * (3 * LOOKBACK)], pa.large_list(pa.float32())),
        "last": [LOOKBACK], "step": [1], "reason": pa.array([None], pa.string()),
    })
    out, failures = Scorer(spec).score(windows)
    assert out.num_rows == 0
    assert failures.to_pydict() == {"unique_id": ["x"],
                                    "reason": [f"3 channels, {FIXED}@1 expects 7"]}


def test_a_row_group_unsorted_inside_still_reads_whole_series(tmp_path: Path) -> None:
    """Touching id ranges prove co-location even when a row group is not sorted inside: the
    rows of the shared id are then found anywhere in it (not only at its start)."""
    table = pa.table({"unique_id": ["a", "a", "b", "a", "c"], "ds": [0, 1, 0, 2, 0],
                      "a": [1.0, 2.0, 3.0, 4.0, 5.0]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)  # [a a] [b a] [c]
    spec = inspect_input(str(tmp_path / "in.parquet"))
    reads = colocated_row_groups(parquet_row_groups(spec), spec)
    assert reads is not None and reads[0]["follow"] and reads[1]["skip"]
    blocks = [read_row_groups(pa.Table.from_pylist([r]), spec=spec) for r in reads]
    got = [sorted(zip(b["unique_id"].cast(pa.string()).to_pylist(), b["ds"].to_pylist(),
                      strict=True)) for b in blocks]
    assert got == [[("a", 0), ("a", 1), ("a", 2)], [("b", 0)], [("c", 0)]]


def test_a_block_scored_again_replaces_its_own_file(registry: Path, tmp_path: Path) -> None:
    """The actor writes a block's forecasts itself, named after the block's first series: a
    block Ray runs again (its actor died) leaves one file, not two; the driver gets only the
    block's report (its failures, and one row with the count scored and the provider)."""
    spec = ScoreSpec(str(registry), FIXED, 1, "fast", HORIZON, (), tuple(CHANNELS), pa.string(),
                     pa.int64(), CPU_ONLY)
    good = [float(v) for v in np.arange(7 * LOOKBACK) % 5]
    windows = pa.table({
        "unique_id": ["a", "b", "c"],
        "values": pa.array([good, good[: 7 * (LOOKBACK - 2)], good], pa.large_list(pa.float32())),
        "last": [LOOKBACK] * 3, "step": [1] * 3,
        "reason": pa.array([None, None, "missing ds within the model window"], pa.string()),
    })
    out = tmp_path / "out"
    scorer = Scorer(spec, output=str(out))
    first, again = scorer(windows), scorer(windows)
    assert first.equals(again)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"part-{files[0].name[5:-8]}.parquet"]
    written = pq.read_table(files[0])
    assert set(written["unique_id"].to_pylist()) == {"a"}
    assert written.num_rows == HORIZON
    report = first.to_pydict()
    assert report["unique_id"] == ["b", "c", None]
    assert str(LOOKBACK) in report["reason"][0]  # too short for the model's lookback
    assert report["reason"][1:] == ["missing ds within the model window", None]
    assert report["scored"] == [0, 0, 1]
    assert report["provider"] == [None, None, "CPUExecutionProvider"]

    # A block of failures only writes nothing.
    report = Scorer(spec, output=str(tmp_path / "none"))(windows.slice(1)).to_pydict()
    assert report["scored"] == [0, 0, 0] and not list((tmp_path / "none").iterdir())


def test_a_block_of_full_windows_scores_as_series_by_series_would(registry: Path) -> None:
    """Full-lookback windows go through `Predictor.forecast_block` in one call; the answer -
    forecasts, interval bands, the failures already known and the windows the model gives no
    finite forecast for - is exactly what the series-by-series path gives."""
    spec = ScoreSpec(str(registry), NAME, 1, "fast", HORIZON, (80.0, 95.0), tuple(CHANNELS),
                     pa.string(), pa.int64(), CPU_ONLY)
    rng = np.random.default_rng(3)
    windows = [rng.standard_normal(7 * LOOKBACK).astype(np.float32) for _ in range(6)]
    windows[4] = np.where(np.arange(7 * LOOKBACK) % 2, 3e38, -3e38).astype(np.float32)
    reasons = [None, "missing ds within the model window", None, None, None, None]
    batch = pa.table({
        "unique_id": [f"s{i}" for i in range(6)],
        "values": pa.array([w.tolist() for w in windows], pa.large_list(pa.float32())),
        "last": pa.array(np.arange(6) * 10, pa.int64()), "step": pa.array([1] * 6, pa.int64()),
        "reason": pa.array(reasons, pa.string()),
    })
    scorer = Scorer(spec)
    assert scorer._block(batch) is not None  # the one-call path is the one taken
    out, failures = scorer.score(batch)
    series_out, series_failures = scorer._score_series(batch)
    assert out.equals(series_out)
    assert failures.equals(series_failures)
    assert failures["unique_id"].to_pylist() == ["s1", "s4"]
    assert "no finite forecast" in failures["reason"][1].as_py()
    assert out.num_rows == 4 * HORIZON and out.schema == spec.output_schema()


# -- bad command lines: a clear message and exit status 2, before Ray starts ---------------------


def test_missing_input_fails_fast_from_the_command_line(registry: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "service.batch_job", "--model", NAME, "--mode", "fast",
         "--input", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "out"),
         "--registry", str(registry)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "nope.parquet" in r.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "nope"}, "unknown model 'nope'"),
        ({"--model": f"{NAME}@canary"}, "has no alias 'canary'"),
        ({"--model": f"{NAME}-ensemble"}, "use --mode accurate"),
        ({"--level": "99.5"}, "level 99.5 is not calibrated"),
        ({"--horizon": str(HORIZON + 1)}, f"forecasts 1..{HORIZON} steps"),
        ({"--input": "notes.txt"}, "cannot tell the format"),
        ({"--input": "no-time.csv"}, "no time column"),
        ({"--output": "taken"}, "already exists"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    change: dict[str, str], message: str,
) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "no-time.csv").write_text("unique_id,when,y\na,1,2.0\n")
    (tmp_path / "ok.csv").write_text("unique_id,ds,y\na,1,2.0\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "part.parquet").write_text("x")
    args = {"--model": NAME, "--mode": "fast", "--input": "ok.csv", "--output": "out",
            "--registry": str(registry), **change}
    for key in ("--input", "--output"):
        args[key] = str(tmp_path / args[key])
    code = main([item for pair in args.items() for item in pair])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("id_kind", ["string", "int", "dictionary", "chunked"])
def test_windows_of_rows_in_any_order_equal_those_of_sorted_rows(id_kind: str) -> None:
    """The window builder orders rows on numeric keys (id rank, null time, time) and skips the
    sort when a block is ordered already: both paths give what sorting the block with Arrow's
    sort_by gives, null times and duplicate times included, ids in ascending order."""
    rng = np.random.default_rng(11)
    kw: dict[str, Any] = {"id_col": "unique_id", "time_col": "ds", "value_cols": ("a",),
                          "time_type": pa.int64(), "lookback": 5}
    for _ in range(20):
        lengths = rng.integers(1, 12, 9)
        raw = np.repeat(rng.permutation(100)[: len(lengths)], lengths)
        ds = pa.array(np.concatenate([rng.permutation(k) for k in lengths]) * 3, pa.int64())
        ds = pc.if_else(pa.array(rng.random(len(raw)) < 0.05), pa.nulls(len(raw), pa.int64()), ds)
        ds = pc.if_else(pa.array(rng.random(len(raw)) < 0.05), pa.scalar(0, pa.int64()), ds)
        ids: pa.Array = pa.array(raw) if id_kind == "int" else pa.array([f"id{i}" for i in raw])
        if id_kind == "dictionary":
            ids = ids.dictionary_encode()
        table = pa.table({"unique_id": ids, "ds": ds, "a": rng.normal(size=len(raw))})
        if id_kind == "chunked":
            half = len(raw) // 2
            table = pa.concat_tables([table.slice(0, half), table.slice(half)])
        id_type = table["unique_id"].type
        shuffled = table.take(pa.array(rng.permutation(table.num_rows)))
        # Rows of equal (id, time) keep their input order (a stable sort), as with sort_by.
        # (Arrow cannot sort dictionary columns, so the reference sorts on the decoded ids.)
        keys = pa.table({"u": shuffled["unique_id"].cast(pa.string()) if id_kind == "dictionary"
                         else shuffled["unique_id"], "ds": shuffled["ds"]})
        ordered = shuffled.take(
            pc.sort_indices(keys, sort_keys=[("u", "ascending"), ("ds", "ascending")]))
        got, want = (build_windows(t, id_type=id_type, **kw).to_pydict()
                     for t in (shuffled, ordered))
        for key in ("unique_id", "last", "step", "reason"):
            assert got[key] == want[key], key
        for a, b in zip(got["values"], want["values"], strict=True):
            assert np.array_equal(a, b, equal_nan=True)
        plain = [str(u) for u in got["unique_id"]] if id_kind != "int" else got["unique_id"]
        assert plain == sorted(plain)


def test_reads_of_a_file_sorted_by_id_hold_whole_series(tmp_path: Path) -> None:
    """Row groups of 3 rows cut series of 1-8 rows anywhere (some span 3 row groups, some row
    groups hold one series' middle only), over two files: each read holds whole series, each
    series in exactly one read, and the windows equal those of the whole table. Unsorted or
    null ids fall back to the shuffle."""
    rng = np.random.default_rng(5)
    kw: dict[str, Any] = {"id_col": "unique_id", "time_col": "ds", "value_cols": ("a",),
                          "time_type": pa.int64(), "id_type": pa.string(), "lookback": 4}
    lengths = rng.integers(1, 9, 40)
    ids = np.repeat([f"u{i:03d}" for i in range(len(lengths))], lengths)
    table = pa.table({"unique_id": ids,
                      "ds": pa.array(np.concatenate([rng.permutation(k) for k in lengths])),
                      "a": rng.normal(size=len(ids))})
    folder = tmp_path / "in"
    folder.mkdir()
    half = int(np.searchsorted(ids, "u020")) + 2  # the second file starts inside a series
    pq.write_table(table.slice(half), folder / "b.parquet", row_group_size=3)
    pq.write_table(table.slice(0, half), folder / "a.parquet", row_group_size=3)
    spec = inspect_input(str(folder))
    reads = colocated_row_groups(parquet_row_groups(spec), spec)
    assert reads is not None and any(r["follow"] for r in reads) and any(r["skip"] for r in reads)
    blocks = [read_row_groups(pa.Table.from_pylist([r]), spec=spec) for r in reads]
    seen = [set(b["unique_id"].cast(pa.string()).to_pylist()) for b in blocks]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == len(lengths)
    assert sum(b.num_rows for b in blocks) == table.num_rows
    got = pa.concat_tables([build_windows(b, **kw) for b in blocks if b.num_rows])
    got = got.sort_by([("unique_id", "ascending")]).to_pydict()
    want = build_windows(table, **kw).to_pydict()
    for key in ("unique_id", "last", "step", "reason"):
        assert got[key] == want[key], key
    assert got["values"] == want["values"]

    # Statistics that do not match the ids (a truncating writer) stop the read, naming it.
    wrong = {**reads[3], "max": "u~"}
    with pytest.raises(JobError, match="statistics say"):
        read_row_groups(pa.Table.from_pylist([wrong]), spec=spec)

    shuffled = tmp_path / "shuffled.parquet"
    pq.write_table(table.take(rng.permutation(table.num_rows)), shuffled, row_group_size=3)
    with_null = tmp_path / "null.parquet"
    pq.write_table(table.set_column(0, "unique_id", pa.array([None, *ids[1:]])), with_null,
                   row_group_size=3)
    for path in (shuffled, with_null):
        spec = inspect_input(str(path))
        assert colocated_row_groups(parquet_row_groups(spec), spec) is None
