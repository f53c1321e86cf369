"""POST /v1/forecast/batch: columnar and row forms, input order, per-series errors, limits."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import numpy as np

from tests.service.conftest import HORIZON, LOOKBACK, NAME, window

PATH = "/v1/forecast/batch"


def columnar(n: int, channels: int = 2,
             sizes: list[int] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    sizes = sizes or [LOOKBACK + i for i in range(n)]
    rng = np.random.default_rng(1)
    values = rng.normal(size=(sum(sizes), channels)).round(3)
    return {"model": NAME, "ids": [f"s{i}" for i in range(n)], "sizes": sizes,
            "n_channels": channels, "values": values.reshape(-1).tolist()}, values


def test_columnar_results_in_input_order(client: httpx.Client) -> None:
    body, values = columnar(5)
    r = client.post(PATH, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [f["id"] for f in out["forecasts"]] == body["ids"]
    ends = np.cumsum(body["sizes"])
    for f, end in zip(out["forecasts"], ends, strict=True):
        assert np.allclose(f["values"], [values[end - 1]] * HORIZON)


def test_columnar_univariate_with_starts(client: httpx.Client) -> None:
    body = {"model": NAME, "ids": ["a", "b"], "sizes": [LOOKBACK, LOOKBACK],
            "values": [float(v) for v in range(2 * LOOKBACK)],
            "starts": ["2024-01-01T00:00:00", 0], "freq": "h", "horizon": 1, "level": [90]}
    r = client.post(PATH, json=body)
    assert r.status_code == 200, r.text
    a, b = r.json()["forecasts"]
    assert a["values"] == [LOOKBACK - 1.0] and b["values"] == [2 * LOOKBACK - 1.0]
    assert a["timestamps"] == ["2024-01-02T08:00:00"] and b["timestamps"] == [LOOKBACK * 3600]
    assert set(a["intervals"]) == {"90"}


def test_a_bad_series_gets_its_own_error(client: httpx.Client) -> None:
    body, _ = columnar(4, sizes=[LOOKBACK, LOOKBACK - 3, LOOKBACK, LOOKBACK])
    bad = (2 * LOOKBACK - 3 + 1) * 2 + 1  # series 2, row 1, channel 1
    body["values"][bad] = "NaN"
    r = client.post(PATH, json=body)
    assert r.status_code == 200, r.text
    f = r.json()["forecasts"]
    assert "values" in f[0] and "values" in f[3]
    assert f[1]["error"]["field"] == "sizes[1]" and "lookback" in f[1]["error"]["message"]
    assert f[2]["error"]["field"] == f"values[{bad}]"
    assert [x["id"] for x in f] == ["s0", "s1", "s2", "s3"]


def test_row_form_with_a_bad_series(client: httpx.Client) -> None:
    bad = window()
    bad[2][1] = None  # type: ignore[call-overload]  # a JSON null
    r = client.post(PATH, json={"model": NAME, "mode": "accurate", "series": [
        {"id": "ok", "values": window()}, {"id": "bad", "values": bad},
        {"id": "short", "values": window(3)}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == "accurate"
    ok, bad_, short = out["forecasts"]
    assert len(ok["values"]) == HORIZON
    assert bad_["error"]["field"] == "series[1].values[2][1]"
    assert short["error"]["field"] == "series[2].values"


def test_all_series_bad_still_answers(client: httpx.Client) -> None:
    r = client.post(PATH, json={"model": NAME, "series": [{"id": 1, "values": [1.0]}]})
    assert r.status_code == 200 and "error" in r.json()["forecasts"][0]


def test_batch_refusals(client: httpx.Client) -> None:
    body, _ = columnar(3)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**body, "ids": ["a", "b", "a"]}, 422, "ids[2]"),
        ({**body, "sizes": body["sizes"][:2]}, 422, "sizes"),
        ({**body, "values": body["values"][:-1]}, 422, "values"),
        ({k: v for k, v in body.items() if k != "sizes"}, 422, "sizes"),
        ({**body, "series": []}, 422, "series"),
        ({"model": NAME}, 422, "series"),
        ({"series": [{"id": "a", "values": window()}, {"id": "a", "values": window()}]}, 422,
         "series[1]"),
        ({**body, "ids": [str(i) for i in range(51)], "sizes": [1] * 51}, 413, "ids"),
        ({**body, "sizes": [100_000, 1, 1]}, 413, "values"),
        ({**body, "horizon": HORIZON + 1}, 422, "horizon"),
        ({**body, "model": "nope"}, 404, "model"),
        ({**body, "starts": ["2024-01-01"]}, 422, "starts"),
    ]
    for payload, status, field in cases:
        r = client.post(PATH, json=payload)
        assert r.status_code == status, (field, r.text)
        assert r.json()["error"]["field"] == field, r.text


def test_msgpack_columnar_with_float32_bins(client: httpx.Client) -> None:
    values = np.random.default_rng(2).normal(size=(2 * LOOKBACK, 3)).astype("<f4")
    body = msgspec.msgpack.encode({
        "model": NAME, "ids": ["a", "b"], "sizes": [LOOKBACK, LOOKBACK], "n_channels": 3,
        "values": values.tobytes(), "level": [80]})
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    r = client.post(PATH, content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    out = msgspec.msgpack.decode(r.content)
    for f, last in zip(out["forecasts"], (values[LOOKBACK - 1], values[-1]), strict=True):
        got = np.frombuffer(f["values"], "<f4").reshape(HORIZON, 3)
        assert np.array_equal(got, np.broadcast_to(last, (HORIZON, 3)))
        lower = np.frombuffer(f["intervals"]["80"]["lower"], "<f4").reshape(HORIZON, 3)
        assert (lower <= got).all()
    # A msgpack request may still ask for JSON, and a wrong byte count names the field.
    r = client.post(PATH, content=body, headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 200 and len(r.json()["forecasts"]) == 2
    bad = msgspec.msgpack.encode({"model": NAME, "ids": ["a"], "sizes": [LOOKBACK],
                                  "values": b"\x00" * 5})
    r = client.post(PATH, content=bad, headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "values"
