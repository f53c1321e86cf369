"""Live accuracy through real HTTP: forecasts with time are remembered (in Redis, and in the
embedded default), POST /v1/actuals matches them once and scores them into /metrics; the memory's
TTL and bound on the real Redis and in process."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from service.core.accuracy import InProcessMemory, RedisMemory, step_bucket, time_key
from tests.service.conftest import (
    HORIZON,
    LOOKBACK,
    NAME,
    Served,
    serving,
    wait_for,
    window,
)


@pytest.fixture
def redis_served(registry_root: Path, redis_url: str, redis_prefix: str) -> Iterator[Served]:
    with serving(registry_root=registry_root, redis_url=redis_url,
                 redis_prefix=redis_prefix) as served:
        yield served


def hours(first: int, n: int) -> list[str]:
    return [f"2024-01-{1 + (first + i) // 24:02d}T{(first + i) % 24:02d}:00:00"
            for i in range(n)]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def forecast(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/forecast", json={"model": NAME, "level": [80], **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_actuals_match_forecasts_once_and_feed_the_metrics(redis_served: Served) -> None:
    values = window(LOOKBACK, channels=2)
    with redis_served.client() as c:
        before = c.get("/metrics").text
        fc = forecast(c, series=[{"id": "s1", "values": values,
                                  "start": "2024-01-01T00:00:00", "freq": "h"}])
        ds = fc["forecasts"][0]["timestamps"]
        assert ds == hours(LOOKBACK, HORIZON)
        # The accurate forecast of the same series is remembered beside the fast one.
        forecast(c, mode="accurate", series=[{"id": "s1", "values": values,
                                              "timestamps": hours(0, LOOKBACK)}])
        last = np.array(values[-1])
        actual = [[float(v) for v in last + d] for d in (0.5, -1.0)]
        r = c.post("/v1/actuals", json={"actuals": [
            {"unique_id": "s1", "ds": ds[0], "values": actual[0]},
            # Another spelling of the same instant matches as well.
            {"unique_id": "s1", "ds": ds[2].replace("T", " ") + "Z", "values": actual[1]},
            {"unique_id": "never", "ds": ds[0], "values": actual[0]},
        ]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["received"], out["matched"], out["unmatched"], out["duplicates"],
                out["pairs"]) == (3, 2, 1, 0, 4)
        fast = next(e for e in out["errors"] if e["mode"] == "fast")
        assert (fast["model"], fast["version"], fast["points"]) == (NAME, 1, 4)
        # The student forecasts the last value: errors 0.5 (step 1) and 1.0 (step 3).
        assert fast["mae"] == pytest.approx(0.75, rel=1e-5)
        assert fast["mse"] == pytest.approx((2 * 0.25 + 2 * 1.0) / 4, rel=1e-5)
        assert 0.0 <= fast["coverage"]["80"] <= 1.0
        accurate = next(e for e in out["errors"] if e["mode"] == "accurate")
        assert accurate["model"] == f"{NAME}-ensemble"
        # Reported again: every pair is a duplicate, nothing is scored twice.
        again = c.post("/v1/actuals", json={"actuals": [
            {"unique_id": "s1", "ds": ds[0], "values": actual[0]}]}).json()
        assert (again["matched"], again["duplicates"], again["pairs"]) == (0, 2, 0)
        after = c.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    fast_labels = {"model": NAME, "version": "1", "mode": "fast"}
    assert delta("distilcast_live_points_total", **fast_labels, step="1") == 2
    assert delta("distilcast_live_points_total", **fast_labels, step="2-4") == 2
    assert delta("distilcast_live_abs_error_total", **fast_labels, step="1") == pytest.approx(1.0)
    assert delta("distilcast_live_squared_error_total", **fast_labels,
                 step="2-4") == pytest.approx(2.0)
    assert delta("distilcast_live_interval_points_total", **fast_labels, level="80") == 4
    assert delta("distilcast_actuals_total", result="matched") == 2
    assert delta("distilcast_actuals_total", result="unmatched") == 1
    assert delta("distilcast_actuals_total", result="duplicate") == 2
    assert delta("distilcast_forecasts_remembered_total", result="ok") == 2
    # The validation error of each version served, for the alert (the fixture has val_mse).
    assert metric(after, "distilcast_model_validation_error", model=NAME, version="1",
                  metric="mse") == pytest.approx(0.36)
    assert metric(after, "distilcast_live_error_alert_factor") == 1.5


def test_a_forecast_on_one_replica_is_scored_on_another(
        registry_root: Path, redis_url: str, redis_prefix: str) -> None:
    settings = {"registry_root": registry_root, "redis_url": redis_url,
                "redis_prefix": redis_prefix}
    with serving(**settings) as a, serving(**settings) as b, a.client() as ca, b.client() as cb:
        fc = forecast(ca, series=[{"id": 5, "values": window(LOOKBACK, channels=1),
                                   "start": 0, "freq": "h"}])
        ds = fc["forecasts"][0]["timestamps"]
        assert ds[0] == LOOKBACK * 3600
        # A stores just after its answer; B can see it once it is in Redis.
        store = redis.Redis.from_url(redis_url)
        wait_for(lambda: store.exists(f"{redis_prefix}acc:i:5"))
        store.close()
        out = cb.post("/v1/actuals", json={"actuals": [
            {"unique_id": "5", "ds": ds[-1], "values": 1.0}]}).json()
        assert (out["matched"], out["pairs"]) == (1, 1)


def test_embedded_default_and_refusals(client: httpx.Client) -> None:
    fc = forecast(client, series=[{"id": "e", "values": window(LOOKBACK, channels=1),
                                   "timestamps": list(range(LOOKBACK))}])
    ds = fc["forecasts"][0]["timestamps"]
    r = client.post("/v1/actuals", json={"actuals": [{"unique_id": "e", "ds": ds[1],
                                                      "values": [0.0]}]})
    assert r.status_code == 200 and r.json()["pairs"] == 1
    # A forecast without time is not remembered: nothing to match.
    forecast(client, series=[{"id": "untimed", "values": window(LOOKBACK, channels=1)}])
    r = client.post("/v1/actuals", json={"actuals": [{"unique_id": "untimed", "ds": 0,
                                                      "values": 1.0}]})
    assert r.json()["unmatched"] == 1
    for body, field in [
        ({"actuals": [{"unique_id": "e", "ds": "yesterday", "values": 1.0}]}, "actuals[0].ds"),
        ({"actuals": [{"unique_id": "e", "ds": 1, "values": []}]}, "actuals[0].values"),
        ({"actuals": [{"unique_id": "e", "ds": 1}]}, "actuals[0].values"),
        ({"actuals": [{"unique_id": "e", "ds": 1, "values": "x"}]}, "actuals[0].values"),
        ({"rows": []}, "rows"),
    ]:
        r = client.post("/v1/actuals", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.json())
    r = client.post("/v1/actuals", content=b'{"actuals": [{"unique_id": "e", "ds": 1, '
                    b'"values": NaN}]}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "actuals[0].values"


def _record(uid: str, t0: float, h: int = 4, ttl: float = 60.0) -> Any:
    from service.core.accuracy import ForecastRecord

    return ForecastRecord(uid, "m", 1, "fast", [t0 + i for i in range(h)],
                          np.zeros((h, 1), np.float32), {}, ttl)


@pytest.mark.parametrize("store", ["redis", "in-process"])
def test_memory_is_bounded_and_expires(store: str, redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> None:
        memory: Any = (RedisMemory(redis_url, redis_prefix, max_values=10) if store == "redis"
                       else InProcessMemory(max_values=10))
        try:
            # Three forecasts of 4 values: the bound (10) keeps the two expiring last.
            await memory.remember([_record("a", 0, ttl=30), _record("b", 0, ttl=60),
                                   _record("c", 0, ttl=90)])
            outcomes = await memory.match([("a", 1.0), ("b", 1.0), ("c", 1.0)])
            got = [len(o.pairs) for o in outcomes]
            if store == "redis":
                assert got == [0, 1, 1]  # the one closest to expiring went first
                n = await memory.client.get(f"{redis_prefix}acc:n")
                assert int(n) == 8
            else:
                assert got == [0, 1, 1]  # in process: the oldest went first
                assert memory.total == 8
            await memory.remember([_record("d", 0, ttl=0.2)])
            await asyncio.sleep(0.4)
            assert [len(o.pairs) for o in await memory.match([("d", 0.0)])] == [0]
        finally:
            await memory.close()

    asyncio.run(scenario())


def test_step_buckets_and_times() -> None:
    assert [step_bucket(s) for s in (1, 2, 4, 5, 24, 96, 97, 720, 721)] == [
        "1", "2-4", "2-4", "5-12", "13-24", "49-96", "97-192", "337-720", "721+"]
    assert time_key("2024-01-01T00:00:00", "ds") == time_key("2024-01-01 00:00:00Z", "ds")
    assert time_key("2024-01-01T01:00:00+01:00", "ds") == time_key("2024-01-01T00:00:00", "ds")
    assert time_key(3, "ds") == 3.0
    assert time.time() > time_key("2024-01-01", "ds")


def test_batch_forecasts_are_remembered_and_channel_counts_must_agree(
        client: httpx.Client) -> None:
    # Columnar batch with starts + freq: every series gets times, every one is remembered.
    n = LOOKBACK
    r = client.post("/v1/forecast/batch", json={
        "model": NAME, "ids": ["b0", "b1"], "sizes": [n, n], "n_channels": 2,
        "values": [float(v) for v in range(2 * n * 2)], "starts": [0, 0], "freq": "h"})
    assert r.status_code == 200, r.text
    ds = r.json()["forecasts"][1]["timestamps"]
    out = client.post("/v1/actuals", json={"actuals": [
        {"unique_id": "b1", "ds": ds[0], "values": [1.0, 2.0]},
        # One value for a two-channel forecast: not its actual.
        {"unique_id": "b0", "ds": ds[0], "values": 1.0},
    ]}).json()
    assert (out["matched"], out["unmatched"], out["pairs"]) == (1, 1, 1)


def test_doc_models_match_the_wire_structs() -> None:
    from service.api.evaluation_schemas import (
        ActualIn,
        ActualsIn,
        ActualsWire,
        ActualWire,
        BacktestIn,
        BacktestWire,
    )

    for doc, wire in ((BacktestIn, BacktestWire), (ActualsIn, ActualsWire),
                      (ActualIn, ActualWire)):
        assert set(doc.model_fields) == set(wire.__struct_fields__), doc.__name__


def test_openapi_documents_both_routes(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path, body, answer in (("/v1/backtest", "BacktestIn", "BacktestOut"),
                               ("/v1/actuals", "ActualsIn", "ActualsOut")):
        post = spec["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/" + body)
        assert post["responses"]["200"]["content"]["application/json"]["schema"][
            "$ref"].endswith("/" + answer)
        assert body in spec["components"]["schemas"] and "422" in post["responses"]


def test_redis_away_forecasts_still_answer_and_actuals_say_503(registry_root: Path) -> None:
    # Nothing listens on the port: the registry degrades to its local copies, forecasts answer
    # (the failed store is counted), and actuals are refused with 503 + Retry-After.
    from tests.models_registry.conftest import free_port

    with serving(registry_root=registry_root,
                 redis_url=f"redis://127.0.0.1:{free_port()}/0") as s, s.client() as c:
        forecast(c, series=[{"id": "r", "values": window(LOOKBACK, channels=1),
                             "start": 0, "freq": "h"}])
        wait_for(lambda: metric(c.get("/metrics").text, "distilcast_forecasts_remembered_total",
                                result="error") >= 1)
        r = c.post("/v1/actuals", json={"actuals": [{"unique_id": "r", "ds": 0,
                                                     "values": 1.0}]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "Redis" in r.json()["error"]["message"]


@pytest.mark.parametrize("store", ["redis", "in-process"])
def test_rolling_forecasts_each_match_the_actuals_they_hold(
        store: str, redis_url: str, redis_prefix: str) -> None:
    """Forecasts of 4 hours first forecasting hours 0..9: the actual at hour 6 is held by those
    starting at hours 3..6 only (steps 4..1); earlier or later ones are not matched."""

    async def scenario() -> None:
        memory: Any = (RedisMemory(redis_url, redis_prefix, max_values=10_000)
                       if store == "redis" else InProcessMemory(max_values=10_000))
        try:
            await memory.remember([_record("s", float(origin)) for origin in range(10)])
            (outcome,) = await memory.match([("s", 6.0)])
            got = sorted((p.record.times[0], p.step) for p in outcome.pairs)
            assert got == [(3.0, 3), (4.0, 2), (5.0, 1), (6.0, 0)]
            (again,) = await memory.match([("s", 6.0)])
            assert (again.pairs, again.duplicates) == ([], 4)
        finally:
            await memory.close()

    asyncio.run(scenario())
