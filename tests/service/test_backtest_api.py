"""POST /v1/backtest through real HTTP: rolling-origin windows, their scores against hand-computed
ones (the fixture student forecasts the last value; the ensemble the mean of the window mean and
last + 1), dated windows, both modes with the gap, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.core.backtest import needed_points, origins
from tests.service.conftest import HORIZON, LOOKBACK, NAME, serving


def history(n: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return (10 + 3 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.5, (n, channels))
            + 5 * np.arange(channels)).astype(np.float32)


def backtest(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/backtest", json={"model": NAME, **body})


def test_origins_follow_cross_validation() -> None:
    # neuralforecast: the last window ends at the last row; earlier ones `step` rows apart.
    assert origins(48, 8, 3, 4) == [32, 36, 40]
    assert needed_points(32, 8, 3, 4) == 48


def test_windows_and_scores_match_a_hand_computation(client: httpx.Client) -> None:
    h, n_windows, step = 6, 3, 4
    n = LOOKBACK + h + step * (n_windows - 1) + 5
    ys = [history(n, seed=0), history(n, seed=1)]
    r = backtest(client, {
        "h": h, "n_windows": n_windows, "step": step, "level": [80],
        "series": [{"id": "a", "values": ys[0][:, 0].tolist()},
                   {"id": 7, "values": ys[1][:, 0].tolist()}],
    })
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["h"], out["n_windows"], out["step"]) == (h, n_windows, step)
    assert len(out["windows"]) == 2 * n_windows
    fast = out["metrics"]["fast"]
    assert (fast["model"], fast["version"], fast["lookback"]) == (NAME, 1, LOOKBACK)
    errors: list[np.ndarray] = []
    for i, sid in enumerate(("a", 7)):
        y = ys[i][:, 0].astype(np.float64)
        series_err = []
        for k, start in enumerate(origins(n, h, n_windows, step)):
            w = out["windows"][i * n_windows + k]
            assert w["unique_id"] == sid
            assert w["cutoff"] == start - 1  # no time given: row positions
            assert w["ds"] == list(range(start, start + h))
            np.testing.assert_allclose(w["y"], y[start : start + h], rtol=1e-6)
            expected = np.full(h, np.float32(y[start - 1]))  # the student: last value
            np.testing.assert_allclose(w["forecast"]["fast"], expected, rtol=1e-6)
            band = w["intervals"]["fast"]["80"]
            assert np.all(np.array(band["lower"]) <= expected)
            assert np.all(np.array(band["upper"]) >= expected)
            series_err.append(np.array(w["forecast"]["fast"]) - y[start : start + h])
        err = np.concatenate(series_err)
        row = fast["series"][i]
        assert row["unique_id"] == sid and row["points"] == n_windows * h
        assert row["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
        assert row["mse"] == pytest.approx((err**2).mean(), rel=1e-6)
        assert 0.0 <= row["coverage"]["80"] <= 1.0
        errors.append(err)
    pooled = np.concatenate(errors)
    assert fast["overall"]["mae"] == pytest.approx(np.abs(pooled).mean(), rel=1e-6)
    assert fast["overall"]["mse"] == pytest.approx((pooled**2).mean(), rel=1e-6)
    assert fast["overall"]["points"] == pooled.size
    inside = sum(
        int(((np.array(w["y"]) >= np.array(w["intervals"]["fast"]["80"]["lower"]))
             & (np.array(w["y"]) <= np.array(w["intervals"]["fast"]["80"]["upper"]))).sum())
        for w in out["windows"])
    assert fast["overall"]["coverage"]["80"] == pytest.approx(inside / pooled.size)
    assert out["gap"] is None and "accurate" not in out["metrics"]


def test_both_modes_give_the_gap_per_window(client: httpx.Client) -> None:
    n = LOOKBACK + HORIZON + 8
    y = history(n, channels=3)
    r = backtest(client, {"mode": "both", "n_windows": 2, "step": 8, "series": [
        {"id": "m", "values": y.tolist(), "start": "2024-01-01T00:00:00", "freq": "h"}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["h"] == HORIZON and set(out["metrics"]) == {"fast", "accurate"}
    assert out["metrics"]["accurate"]["model"] == f"{NAME}-ensemble"
    gaps = []
    for k, start in enumerate(origins(n, HORIZON, 2, 8)):
        w = out["windows"][k]
        # Dated windows: the cutoff is the last hour the model saw.
        assert w["cutoff"] == f"2024-01-0{1 + (start - 1) // 24}T{(start - 1) % 24:02d}:00:00"
        assert len(w["ds"]) == HORIZON and w["ds"][0] > w["cutoff"]
        x = y[start - LOOKBACK : start].astype(np.float64)
        accurate = (x.mean(axis=0) + x[-1] + 1) / 2
        np.testing.assert_allclose(w["forecast"]["accurate"], np.tile(accurate, (HORIZON, 1)),
                                   rtol=1e-5)
        diff = np.abs(np.array(w["forecast"]["fast"]) - np.array(w["forecast"]["accurate"]))
        assert w["gap"]["mae"] == pytest.approx(diff.mean(), rel=1e-5)
        scale = np.sqrt(x.var(axis=0) + 1e-5)
        assert w["gap"]["zmae"] == pytest.approx((diff / scale).mean(), rel=1e-4)
        gaps.append(w["gap"]["mae"])
    assert out["gap"]["mae"] == pytest.approx(np.mean(gaps), rel=1e-6)


def test_timestamps_give_ds_and_cutoff(client: httpx.Client) -> None:
    n = LOOKBACK + 4
    stamps = [1000 + 60 * i for i in range(n)]
    r = backtest(client, {"h": 4, "series": [
        {"id": "s", "values": history(n)[:, 0].tolist(), "timestamps": stamps}]})
    assert r.status_code == 200, r.text
    w = r.json()["windows"][0]
    assert w["cutoff"] == stamps[LOOKBACK - 1] and w["ds"] == stamps[LOOKBACK:]


def test_a_short_history_says_how_many_points_it_needs(client: httpx.Client) -> None:
    need = needed_points(LOOKBACK, 4, 5, 2)
    r = backtest(client, {"h": 4, "n_windows": 5, "step": 2, "series": [
        {"id": "ok", "values": history(need)[:, 0].tolist()},
        {"id": "short", "values": history(need - 1)[:, 0].tolist()}]})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == "series[1].values"
    assert f"need at least {need} points" in error["message"]


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"h": HORIZON + 1}, 422, "h"),
    ({"n_windows": 0}, 422, "n_windows"),
    ({"step": 0}, 422, "step"),
    ({"mode": "auto"}, 422, "mode"),
    ({"level": [81.5]}, 422, "level[0]"),
    ({"model": "nope"}, 404, "model"),
    ({"n_windows": 30}, 413, "n_windows"),  # 2 series x 30 windows > 50 series per request
])
def test_refusals_name_the_field(client: httpx.Client, body: dict[str, Any], status: int,
                                 field: str) -> None:
    n = LOOKBACK + HORIZON + 29 * HORIZON
    series = [{"id": i, "values": history(n)[:, 0].tolist()} for i in range(2)]
    r = backtest(client, {"series": series, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_the_series_and_point_limits_apply(client: httpx.Client) -> None:
    r = backtest(client, {"series": [{"id": i, "values": [1.0] * 50} for i in range(51)]})
    assert r.status_code == 413 and r.json()["error"]["field"] == "series"


def test_keys_and_draining_guard_both_routes(registry_root: Path) -> None:
    from service.api.access import key_digest

    body = {"model": NAME, "series": [{"id": "a", "values": history(LOOKBACK + HORIZON)[:, 0]
                                       .tolist()}]}
    actuals = {"actuals": [{"unique_id": "a", "ds": 0, "values": 1.0}]}
    with serving(registry_root=registry_root, api_keys=(key_digest("secret-key"),)) as s, \
            s.client() as c:
        for path, payload in (("/v1/backtest", body), ("/v1/actuals", actuals)):
            assert c.post(path, json=payload).status_code == 401
            assert c.post(path, json=payload, headers={"X-API-Key": "wrong"}).status_code == 403
            r = c.post(path, json=payload, headers={"X-API-Key": "secret-key"})
            assert r.status_code == 200, r.text
        s.services.draining = True
        r = c.post("/v1/backtest", json=body, headers={"X-API-Key": "secret-key"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        s.services.draining = False
