"""POST /v1/forecast through real HTTP: answers, modes, intervals, time axes, and every refusal."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service.conftest import FIXED, HORIZON, LOOKBACK, NAME, window
from tests.service.onnx_models import LEVELS, flat_calibration


def post(client: httpx.Client, body: dict[str, Any] | bytes, path: str = "/v1/forecast"
         ) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"Content-Type": "application/json"})
    return client.post(path, json=body)


def test_fast_forecast_is_the_students(client: httpx.Client) -> None:
    values = window(LOOKBACK + 5, channels=3)  # longer than the lookback: the last L are used
    r = post(client, {"model": NAME, "series": [{"id": "a", "values": values}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["model"], out["version"], out["mode"]) == (NAME, 1, "fast")
    assert out["provider"] == "CPUExecutionProvider"
    assert out["horizon"] == HORIZON
    f = out["forecasts"][0]
    assert f["id"] == "a"
    assert np.allclose(f["values"], [values[-1]] * HORIZON)  # the last value, repeated
    assert "timestamps" not in f and "intervals" not in f
    assert set(out["timing"]) == {"total_ms", "queue_ms", "inference_ms"}


def test_accurate_is_the_mean_of_the_teachers(client: httpx.Client) -> None:
    values = np.arange(LOOKBACK * 2, dtype=float).reshape(LOOKBACK, 2)
    r = post(client, {"model": NAME, "mode": "accurate",
                      "series": [{"id": 7, "values": values.tolist()}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["model"], out["mode"]) == (f"{NAME}-ensemble", "accurate")
    expected = (values.mean(axis=0) + values[-1] + 1.0) / 2  # teachers: mean, last + 1
    assert out["forecasts"][0]["id"] == 7
    assert np.allclose(out["forecasts"][0]["values"], [expected] * HORIZON)


def test_ensemble_named_directly_and_fast_on_it_is_refused(client: httpx.Client) -> None:
    body = {"model": f"{NAME}-ensemble@production", "mode": "accurate",
            "series": [{"id": "a", "values": window()}]}
    assert post(client, body).json()["mode"] == "accurate"
    r = post(client, {**body, "mode": "fast"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "mode"


def test_accurate_for_a_student_version_uses_its_recorded_ensemble(client: httpx.Client) -> None:
    r = post(client, {"model": f"{NAME}@1", "mode": "accurate",
                      "series": [{"id": "a", "values": window()}]})
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["version"]) == (f"{NAME}-ensemble", 1)


def test_auto_follows_the_deadline(client: httpx.Client) -> None:
    body = {"model": NAME, "mode": "auto", "series": [{"id": "a", "values": window()}]}
    assert post(client, {**body, "deadline_ms": 10_000}).json()["mode"] == "accurate"
    assert post(client, {**body, "deadline_ms": 1e-6}).json()["mode"] == "fast"


def test_univariate_in_univariate_out_and_horizon_truncation(client: httpx.Client) -> None:
    values = [float(v) for v in range(LOOKBACK)]
    r = post(client, {"model": NAME, "horizon": 3, "series": [{"id": "u", "values": values}]})
    assert r.status_code == 200, r.text
    assert r.json()["horizon"] == 3
    assert r.json()["forecasts"][0]["values"] == [values[-1]] * 3


def test_intervals_are_quantile_times_window_std(client: httpx.Client) -> None:
    values = np.random.default_rng(0).normal(size=(LOOKBACK, 2))
    r = post(client, {"model": NAME, "level": [80, 95],
                      "series": [{"id": "a", "values": values.tolist()}]})
    assert r.status_code == 200, r.text
    f = r.json()["forecasts"][0]
    cal = flat_calibration(HORIZON)
    s = np.sqrt(values.var(axis=0) + 1e-5)
    for level in (80, 95):
        q = np.array(cal.quantiles[LEVELS.index(level)])[:, None]
        band = f["intervals"][str(level)]
        assert np.allclose(band["lower"], values[-1] - q * s, atol=1e-4)
        assert np.allclose(band["upper"], values[-1] + q * s, atol=1e-4)


def test_timestamps_infer_the_step(client: httpx.Client) -> None:
    stamps = [f"2024-01-01T{h:02d}:00:00" for h in range(24)] + [
        f"2024-01-02T{h:02d}:00:00" for h in range(LOOKBACK - 24)]
    r = post(client, {"model": NAME, "horizon": 2, "series": [
        {"id": "a", "values": window(), "timestamps": stamps},
        {"id": "b", "values": window(), "start": "2024-03-01 00:00:00", "freq": "15min"},
        {"id": "c", "values": window(), "timestamps": list(range(0, LOOKBACK * 60, 60))},
    ]})
    assert r.status_code == 200, r.text
    a, b, c = r.json()["forecasts"]
    assert a["timestamps"] == ["2024-01-02T08:00:00", "2024-01-02T09:00:00"]
    assert b["timestamps"] == ["2024-03-01 08:00:00", "2024-03-01 08:15:00"]
    assert c["timestamps"] == [LOOKBACK * 60, LOOKBACK * 60 + 60]


def test_default_model_and_aliases(client: httpx.Client) -> None:
    for model in (f"{NAME}@production", f"{NAME}@1"):
        r = post(client, {"model": model, "series": [{"id": "a", "values": window()}]})
        assert r.status_code == 200 and r.json()["version"] == 1


def _nan_body() -> bytes:
    values = window()
    values[3][2] = float("nan")
    return json.dumps({"model": NAME, "series": [{"id": "a", "values": values}]}).encode()


def _ragged() -> list[Any]:
    values: list[Any] = window()
    values[5] = values[5][:2]
    return values


def _with(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": NAME, "series": [{"id": "a", "values": window()}]}
    series = {k[2:]: v for k, v in kw.items() if k.startswith("s_")}
    body["series"][0].update(series)
    body.update({k: v for k, v in kw.items() if not k.startswith("s_")})
    return body


BAD: list[tuple[str, dict[str, Any] | bytes, int, str]] = [
    ("nan literal", _nan_body(), 422, "series[0].values[3][2]"),
    ("infinity literal",
     b'{"model": "etth1-h96", "series": [{"id": "a", "values": [1.0, Infinity]}]}',
     422, "series[0].values[1]"),
    ("inf by overflow", b'{"series": [{"id": "a", "values": [1.0, 2.0, 1e999]}]}',
     422, "series[0].values[2]"),
    ("above float32", _with(s_values=[1.0] * (LOOKBACK - 1) + [1e39]), 422,
     "series[0].values[31]"),
    ("null value", _with(s_values=[1.0, None]), 422, "series[0].values[1]"),
    ("string value", _with(s_values=[[1.0, "x"]]), 422, "series[0].values[0][1]"),
    ("too short", _with(s_values=window(LOOKBACK - 1)), 422, "series[0].values"),
    ("ragged rows", _with(s_values=_ragged()), 422, "series[0].values[5]"),
    ("mixed rows", _with(s_values=[[1.0], 2.0]), 422, "series[0].values[1]"),
    ("empty row", _with(s_values=[[]]), 422, "series[0].values[0]"),
    ("empty values", _with(s_values=[]), 422, "series[0].values"),
    ("wrong channel count", _with(model=FIXED, s_values=window(channels=3)), 422,
     "series[0].values"),
    ("horizon above the model's", _with(horizon=HORIZON + 1), 422, "horizon"),
    ("horizon zero", _with(horizon=0), 422, "horizon"),
    ("horizon wrong type", _with(horizon="3"), 422, "horizon"),
    ("level not calibrated", _with(level=[80, 42.5]), 422, "level[1]"),
    ("level out of range", _with(level=[100]), 422, "level[0]"),
    ("unknown mode", _with(mode="fastest"), 422, "mode"),
    ("unknown model", _with(model="nope"), 404, "model"),
    ("unknown alias", _with(model=f"{NAME}@canary"), 404, "model"),
    ("unknown version", _with(model=f"{NAME}@9"), 404, "model"),
    ("bad model name", _with(model="Bad/Name"), 422, "model"),
    ("empty series", {"model": NAME, "series": []}, 422, "series"),
    ("no series", {"model": NAME}, 422, "series"),
    ("missing id", {"series": [{"values": window()}]}, 422, "series[0].id"),
    ("unknown field", _with(s_value=[1.0]), 422, "series[0].value"),
    ("start without freq", _with(s_start="2024-01-01"), 422, "series[0].freq"),
    ("bad freq", _with(s_start="2024-01-01", s_freq="fortnight"), 422, "series[0].freq"),
    ("bad timestamp", _with(s_timestamps=["x"] * LOOKBACK), 422, "series[0].timestamps[0]"),
    ("timestamps count", _with(s_timestamps=[1, 2]), 422, "series[0].timestamps"),
    ("not json", b"{not json", 400, "body"),
    ("empty body", b"", 400, "body"),
    ("not an object", b"[1, 2]", 422, "body"),
    ("too many series", {"series": [{"id": i, "values": [1.0]} for i in range(51)]}, 413,
     "series"),
    ("oversized body", _with(s_values=[[1.0] * 7] * 10_000), 413, "body"),
]


@pytest.mark.parametrize(("body", "status", "field"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_is_refused_naming_the_field(client: httpx.Client, body: Any, status: int,
                                               field: str) -> None:
    r = post(client, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field, error
    assert error["code"] and error["message"]


def test_duplicate_ids_in_one_request(client: httpx.Client) -> None:
    r = post(client, {"series": [{"id": "a", "values": window()},
                                 {"id": "a", "values": window()}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "series[1]"


def test_unknown_route_and_method_answer_json(client: httpx.Client) -> None:
    r = client.get("/v1/forecast")
    assert r.status_code == 405 and "error" in r.json()
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
