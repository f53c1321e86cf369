"""Promotions: across replicas through Redis, hot swap under load, failed loads, queue overload,
provider fallback, shadow gap, draining on shutdown."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from models_registry.store import FilesystemStore
from service.core.engine import EngineOptions, OrtEngine
from tests.service.conftest import HORIZON, LOOKBACK, NAME, TOKEN, Served, serving, wait_for, window
from tests.service.onnx_models import linear_bytes, manifest

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def register_v2(store: FilesystemStore, payload: bytes | None = None) -> int:
    """A second student version: forecasts 2 x the last value (or arbitrary bytes)."""
    m = store.register(
        manifest(NAME, "student", LOOKBACK, HORIZON, architecture="twice-last"),
        payload if payload is not None else linear_bytes(LOOKBACK, HORIZON, w_last=2.0),
    )
    return m.version


def forecast(client: httpx.Client, **kw: Any) -> httpx.Response:
    return client.post("/v1/forecast", json={"model": NAME, "series": [
        {"id": "a", "values": window(channels=1)}], **kw})


def metric_lines(client: httpx.Client, name: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines()
            if line.startswith(name)]


def test_promotion_reaches_a_second_replica_through_redis(
        fresh_registry: tuple[Path, FilesystemStore], redis_url: str, redis_prefix: str) -> None:
    root, store = fresh_registry
    v2 = register_v2(store)
    common = {"registry_root": root / "registry", "redis_url": redis_url,
              "redis_prefix": redis_prefix}
    with serving(**common) as a, serving(**common) as b, a.client() as ca, b.client() as cb:
        assert b.services.registry.listening  # B hears promotions over Redis pub/sub
        assert forecast(cb).json()["version"] == 1
        r = ca.put(f"/v1/models/{NAME}/aliases/production", json={"version": v2}, headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
        gate = out.pop("gate")
        assert out == {"name": NAME, "alias": "production", "version": v2, "previous": 1,
                       "serving": v2, "forced": False}
        assert gate["passed"] and gate["current_version"] == 1  # equal validation MSE
        assert forecast(ca).json()["version"] == v2
        # Well inside the registry's 10 s resync: this is the pub/sub event.
        out = wait_for(lambda: (j := forecast(cb).json())["version"] == v2 and j, timeout=5)
        assert out["forecasts"][0]["values"][0] == [2.0 * (LOOKBACK - 1)]
        assert cb.get(f"/v1/models/{NAME}").json()["serving"]["aliases"] == {
            "production": v2, "staging": v2}


def test_hot_swap_keeps_serving_during_a_promotion(
        fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, store = fresh_registry
    v2 = register_v2(store)
    with serving(registry_root=root / "registry") as s:
        seen: list[tuple[int, int]] = []
        stop = threading.Event()

        def hammer() -> None:
            with s.client() as c:
                while not stop.is_set():
                    r = forecast(c)
                    seen.append((r.status_code, r.json().get("version", -1)))

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(hammer) for _ in range(3)]
            wait_for(lambda: len(seen) > 20)
            with s.client() as c:
                r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": v2},
                          headers=AUTH)
                assert r.status_code == 200 and r.json()["serving"] == v2
            count = len(seen)
            wait_for(lambda: len(seen) > count + 20)
            stop.set()
            for f in futures:
                f.result()
        assert {status for status, _ in seen} == {200}
        versions = [v for _, v in seen]
        assert versions[0] == 1 and versions[-1] == v2
        # The old version is released once its requests are done.
        pool_ = s.services.pool
        wait_for(lambda: pool_.get((NAME, 1)) is None)
        with s.client() as c:
            loaded = metric_lines(c, "distilcast_model_loaded{")
            assert any(f'model="{NAME}"' in x and 'version="1"' in x and x.endswith(" 0.0")
                       for x in loaded), loaded
            assert metric_lines(c, "distilcast_model_swaps_total{")


def test_failed_load_keeps_the_old_version(fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, store = fresh_registry
    broken = register_v2(store, b"this is not an onnx graph")  # sha256 matches: registry is ok
    with serving(registry_root=root / "registry") as s, s.client() as c:
        r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": broken},
                  headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == broken and r.json()["serving"] == 1
        out = forecast(c)
        assert out.status_code == 200 and out.json()["version"] == 1
        model = c.get(f"/v1/models/{NAME}").json()
        assert model["aliases"]["production"] == broken  # the registry moved on ...
        assert model["serving"]["aliases"]["production"] == 1  # ... this replica did not
        failures = [x for x in metric_lines(c, "distilcast_model_loads_total{")
                    if f'model="{NAME}"' in x and 'outcome="ok"' not in x]
        assert failures and float(failures[0].split()[-1]) >= 1


def test_corrupt_artifact_found_by_the_periodic_refresh(
        fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, store = fresh_registry
    v2 = register_v2(store)
    with serving(registry_root=root / "registry", alias_refresh_s=0.2) as s, s.client() as c:
        # Another replica promoted v2, then its bytes rotted on disk.
        store.onnx_path(NAME, v2).write_bytes(b"corrupt")
        (root / "registry" / NAME / "aliases.json").write_text(json.dumps({"production": v2}))
        wait_for(lambda: any('outcome="IntegrityError"' in x for x in
                             metric_lines(c, "distilcast_model_loads_total{")))
        assert forecast(c).json()["version"] == 1


def slow_down(served: Served, seconds: float) -> None:
    for model in served.services.pool.served():
        run = model.batcher._run

        def slow(x: np.ndarray, run: Any = run) -> np.ndarray:
            time.sleep(seconds)
            return run(x)

        model.batcher._run = slow


def test_full_queue_answers_503_with_retry_after(
        fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, _ = fresh_registry
    with serving(registry_root=root / "registry", batch_max_queue=1, inline_max_ms=0,
                 batch_max_size=1) as s:
        slow_down(s, 0.4)

        def one(_: int) -> httpx.Response:
            with s.client() as c:
                return forecast(c)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(one, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and codes.count(503) >= 2, codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert int(rejected.headers["Retry-After"]) >= 1
        assert rejected.json()["error"]["code"] == "overloaded"
        with s.client() as c:
            assert metric_lines(c, 'distilcast_rejections_total{reason="overloaded"}')


def test_shutdown_drains_in_flight_requests(fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, _ = fresh_registry
    with serving(registry_root=root / "registry", inline_max_ms=0) as s:
        slow_down(s, 0.5)
        with ThreadPoolExecutor(1) as pool, s.client() as c:
            pending = pool.submit(forecast, c)
            wait_for(lambda: s.services.load.value > 0)
            s.server.should_exit = True
            assert pending.result().status_code == 200


def test_cuda_requested_without_cuda_runs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_bytes = linear_bytes(LOOKBACK, HORIZON)
    options = EngineOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    # As if onnxruntime-gpu were installed on a machine whose CUDA session then fails.
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession
    tried: list[list[str]] = []

    def session(*args: Any, providers: list[str], **kw: Any) -> Any:
        tried.append(providers)
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("CUDA driver not found")
        return real(*args, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    engine = OrtEngine(onnx_bytes, options, label="t")
    assert engine.provider == "CPUExecutionProvider"
    assert tried == [["CUDAExecutionProvider", "CPUExecutionProvider"],
                     ["CPUExecutionProvider"]]
    monkeypatch.setattr(ort, "InferenceSession", real)
    # And when the build has no CUDA at all, asking for it is harmless.
    monkeypatch.undo()
    assert OrtEngine(onnx_bytes, options).provider == "CPUExecutionProvider"


def test_cuda_preference_served_over_http_reports_cpu(client: httpx.Client) -> None:
    # The shared app asks for CUDA first (the default) on this CPU-only machine.
    r = forecast(client)
    assert r.json()["provider"] == "CPUExecutionProvider"


def test_shadow_gap_is_recorded(fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, _ = fresh_registry
    values = np.random.default_rng(3).normal(size=(LOOKBACK, 2))
    s_ = np.sqrt(values.var(axis=0) + 1e-5)
    ensemble = (values.mean(axis=0) + values[-1] + 1.0) / 2
    expected = float((np.abs(values[-1] - ensemble) / s_).mean())
    with serving(registry_root=root / "registry", shadow_fraction=1.0) as s, s.client() as c:
        r = c.post("/v1/forecast", json={"model": NAME, "series": [
            {"id": "a", "values": values.tolist()}]})
        assert r.status_code == 200 and r.json()["mode"] == "fast"

        def observed() -> list[str]:
            return [x for x in metric_lines(c, "distilcast_shadow_gap_zmae_")
                    if f'model="{NAME}"' in x and ("_count" in x or "_sum" in x)]

        lines = wait_for(lambda: len(observed()) == 2 and observed())
        values_ = {x.split("{")[0]: float(x.split()[-1]) for x in lines}
        count = values_["distilcast_shadow_gap_zmae_count"]
        assert count >= 1
        assert values_["distilcast_shadow_gap_zmae_sum"] / count == pytest.approx(expected,
                                                                                 rel=1e-3)


def test_without_the_fast_path_the_fastapi_routes_answer_the_same(registry_root: Path) -> None:
    with serving(registry_root=registry_root, fast_path=False) as s, s.client() as c:
        assert forecast(c).json()["version"] == 1
        r = c.post("/v1/forecast", json={"series": [{"id": "a", "values": [1.0, None]}]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "series[0].values[1]"
        r = c.post("/v1/forecast/batch", json={"model": NAME, "ids": ["a"], "sizes": [LOOKBACK],
                                               "values": [1.0] * LOOKBACK})
        assert r.status_code == 200 and len(r.json()["forecasts"][0]["values"]) == HORIZON


def test_redis_down_degrades_but_stays_ready(registry_root: Path) -> None:
    # Nothing listens on port 1: the cache is unavailable, the filesystem still serves.
    with serving(registry_root=registry_root, redis_url="redis://127.0.0.1:1/15") as s, \
            s.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["cache_available"] is False
        assert forecast(c).status_code == 200
        assert "distilcast_registry_cache_available 0.0" in c.get("/metrics").text
