"""POST /v1/forecast/batch with Arrow IPC (application/vnd.apache.arrow.stream) over real HTTP:
the answer equals the JSON one to 1e-6, future times continue each series, and the refusals name
the column, row or query parameter."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow as pa
import pytest

from tests.service.conftest import HORIZON, LOOKBACK, NAME

ARROW = "application/vnd.apache.arrow.stream"


def stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read(body: bytes) -> pa.Table:
    return pa.ipc.open_stream(body).read_all()


def table(n_series: int, n: int = LOOKBACK, seed: int = 0, ds: bool = True) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {
        "unique_id": pa.array(np.repeat([f"s{i}" for i in range(n_series)], n)),
    }
    if ds:
        start = np.datetime64("2024-03-01T00:00", "s")
        ticks = start + np.tile(np.arange(n) * 900, n_series).astype("timedelta64[s]")
        cols["ds"] = pa.array(ticks, pa.timestamp("s"))
    cols["load"] = pa.array(rng.normal(0, 1, n_series * n).astype(np.float32))
    cols["temp"] = pa.array(rng.normal(5, 1, n_series * n))  # float64: cast by the service
    return pa.table(cols)


def post(client: httpx.Client, body: bytes, params: dict[str, object] | None = None,
         accept: str = ARROW) -> httpx.Response:
    return client.post("/v1/forecast/batch", content=body,
                       params={"model": NAME, **(params or {})},
                       headers={"content-type": ARROW, "accept": accept})


def test_arrow_answer_equals_json(client: httpx.Client) -> None:
    t = table(20)
    r = post(client, stream(t), {"level": [80, 95], "h": 5})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ARROW
    out = read(r.content)
    meta = {k.decode(): v.decode() for k, v in out.schema.metadata.items()}
    assert (meta["model"], meta["version"], meta["mode"], meta["failures"]) == (
        NAME, "1", "fast", "[]")
    assert out.column_names == ["unique_id", "ds", "load", "temp", "load-lo-80", "load-hi-80",
                                "load-lo-95", "load-hi-95", "temp-lo-80", "temp-hi-80",
                                "temp-lo-95", "temp-hi-95"]
    assert out.schema.field("ds").type == pa.timestamp("s")
    # The same windows as a JSON columnar body.
    values = np.column_stack([t["load"].to_numpy(), t["temp"].to_numpy()])
    j = client.post("/v1/forecast/batch", json={
        "model": NAME, "level": [80, 95], "horizon": 5, "ids": [f"s{i}" for i in range(20)],
        "sizes": [LOOKBACK] * 20, "n_channels": 2, "values": values.reshape(-1).tolist()})
    assert j.status_code == 200, j.text
    for i, f in enumerate(j.json()["forecasts"]):
        rows = slice(5 * i, 5 * (i + 1))
        assert out["unique_id"][rows.start].as_py() == f["id"]
        got = np.column_stack([out[c].to_numpy()[rows] for c in ("load", "temp")])
        np.testing.assert_allclose(got, f["values"], rtol=1e-6, atol=1e-6)
        for level in ("80", "95"):
            for side, key in (("lo", "lower"), ("hi", "upper")):
                got = np.column_stack([out[f"{c}-{side}-{level}"].to_numpy()[rows]
                                       for c in ("load", "temp")])
                np.testing.assert_allclose(got, f["intervals"][level][key], rtol=1e-6,
                                           atol=1e-6)
    # Future times: every 15 minutes after each series' last.
    last = t["ds"].to_numpy()[LOOKBACK - 1]
    expected = last + (np.arange(1, 6) * 900).astype("timedelta64[s]")
    assert (out["ds"].to_numpy()[:5] == expected).all()


def test_arrow_request_answered_in_json_when_asked(client: httpx.Client) -> None:
    r = post(client, stream(table(3, ds=False)), accept="application/json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert [f["id"] for f in body["forecasts"]] == ["s0", "s1", "s2"]
    assert np.asarray(body["forecasts"][0]["values"]).shape == (HORIZON, 2)


def test_arrow_request_with_time_answered_in_json_gets_iso_timestamps(
    client: httpx.Client,
) -> None:
    r = post(client, stream(table(2)), accept="application/json")
    assert r.status_code == 200
    last = np.datetime64("2024-03-01T00:00", "s") + np.timedelta64((LOOKBACK - 1) * 900, "s")
    want = [str(last + np.timedelta64(900 * k, "s")) for k in range(1, HORIZON + 1)]
    for f in r.json()["forecasts"]:
        assert f["timestamps"] == want  # as a JSON request's answer writes them, not seconds


def test_categorical_ids(client: httpx.Client) -> None:
    t = table(2)
    t = t.set_column(0, "unique_id", t["unique_id"].dictionary_encode())
    out = read(post(client, stream(t)).content)
    assert out["unique_id"].to_pylist() == ["s0"] * HORIZON + ["s1"] * HORIZON


def test_integer_time_and_no_time(client: httpx.Client) -> None:
    t = table(2, ds=False)
    ints = t.add_column(1, "ds", pa.array(np.tile(np.arange(LOOKBACK) * 7, 2), pa.int64()))
    out = read(post(client, stream(ints)).content)
    assert out["ds"].to_pylist()[:3] == [(LOOKBACK - 1) * 7 + 7 * k for k in (1, 2, 3)]
    assert "ds" not in read(post(client, stream(t)).content).column_names


def test_bad_series_fail_alone(client: httpx.Client) -> None:
    t = table(3)
    load = t["load"].to_numpy().copy()
    load[LOOKBACK + 4] = np.nan  # series s1, row 4
    ds = t["ds"].to_numpy().copy()
    ds[2 * LOOKBACK + 7] = ds[2 * LOOKBACK + 6]  # series s2: a duplicated time
    t = t.set_column(2, "load", pa.array(load)).set_column(1, "ds", pa.array(ds))
    out = read(post(client, stream(t)).content)
    failures = __import__("json").loads(out.schema.metadata[b"failures"])
    assert [(f["id"], f["error"]["field"]) for f in failures] == [
        ("s1", f"load[{LOOKBACK + 4}]"), ("s2", f"ds[{2 * LOOKBACK + 7}]")]
    assert set(out["unique_id"].to_pylist()) == {"s0"}


@pytest.mark.parametrize(("body", "params", "status", "field"), [
    (b"not arrow", {}, 400, "body"),
    (stream(table(2).drop_columns(["unique_id"])), {}, 422, "unique_id"),
    (stream(table(2).drop_columns(["load", "temp"])), {}, 422, "values"),
    (stream(table(2).set_column(2, "load", pa.array(["x"] * 2 * LOOKBACK))), {}, 422, "load"),
    (stream(pa.concat_tables([table(2), table(2)])), {}, 422, f"unique_id[{2 * LOOKBACK}]"),
    (stream(table(1)), {"mode": "slow"}, 422, "mode"),
    (stream(table(1).set_column(0, "unique_id", pa.array([1.5] * LOOKBACK))), {}, 422,
     "unique_id"),
    (stream(pa.table([pa.array(["a"] * 4), pa.array([1.0] * 4), pa.array([2.0] * 4)],
                     names=["unique_id", "y", "y"])), {}, 422, "y"),
    (stream(table(1)), {"h": "0"}, 422, "h"),
    (stream(table(1)), {"level": "100"}, 422, "level"),
    (stream(table(1)), {"colour": "red"}, 422, "colour"),
    (stream(table(1)), {"h": HORIZON + 1}, 422, "horizon"),
])
def test_refusals_name_the_field(client: httpx.Client, body: bytes, params: dict[str, object],
                                 status: int, field: str) -> None:
    r = post(client, body, params)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
