"""Live accuracy end to end: the service (two uvicorn workers, multiprocess metrics, the real
Redis holding the remembered forecasts) answers timed forecasts, then their actuals arrive; a real
Prometheus scrapes it, every PromQL expression of the dashboard's "Live accuracy" row returns data
and the live-error alert's expression selects the version whose error is above its validation
error (the alert is pending: its `for` is 30 minutes; promtool's unit test shows it firing)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from models_registry.store import FilesystemStore
from tests.deploy.test_prometheus_dashboard import (
    DASHBOARD,
    REPO,
    RULES,
    prometheus_binary,
    query,
    rows,
    wait_http,
)
from tests.models_registry.conftest import free_port
from tests.service.onnx_models import build_family
from tests.strict import missing

L, H = 96, 24
NAME = "etth1-h96"
REDIS_URL = os.environ.get("DISTILCAST_REDIS_URL", "redis://127.0.0.1:6379/15")
ALERT = "DistilcastLiveErrorAboveValidation"


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def service(tmp_path: Path, prefix: str) -> Iterator[str]:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        missing("redis", f"Redis at {REDIS_URL} is unreachable: {exc}")
    build_family(FilesystemStore(tmp_path / "registry"), NAME, L, H)
    port = free_port()
    env = {
        **os.environ,
        "DISTILCAST_REGISTRY_ROOT": str(tmp_path / "registry"),
        "DISTILCAST_PORT": str(port),
        "DISTILCAST_HOST": "127.0.0.1",
        "DISTILCAST_WORKERS": "2",
        "DISTILCAST_REDIS_URL": REDIS_URL,
        "DISTILCAST_REDIS_PREFIX": prefix,
        "DISTILCAST_SHADOW_FRACTION": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    proc = subprocess.Popen(["bash", "scripts/launch_service.sh"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def prometheus(tmp_path: Path, service: str) -> Iterator[str]:
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}/*.yml\n"
        "scrape_configs:\n  - job_name: distilcast\n"
        f"    static_configs:\n      - targets: ['{service.removeprefix('http://')}']\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def forecasts_then_actuals(base: str, prefix: str, stop: threading.Event,
                           answers: list[dict[str, Any]], failures: list[str]) -> None:
    """Each round forecasts two series from a new origin (fast and accurate, with intervals),
    then reports the actuals of every forecast hour 5 above the student's forecast, one actual
    of a series never forecast, and one actual again."""
    window = [[float(i % 24) + c for c in range(3)] for i in range(L)]
    origin = datetime(2024, 1, 1)
    store = redis.Redis.from_url(REDIS_URL)
    with httpx.Client(base_url=base, timeout=10.0) as client:
        i = 0
        while not stop.is_set():
            # Rounds H hours apart: no forecast holds an hour an earlier round reported.
            start = (origin + timedelta(hours=i * H)).isoformat()
            sent: list[dict[str, Any]] = []
            for mode in ("fast", "accurate"):
                r = client.post("/v1/forecast", json={
                    "model": NAME, "mode": mode, "level": [80],
                    "series": [{"id": sid, "values": window, "start": start, "freq": "h"}
                               for sid in ("s1", "s2")]})
                if r.status_code != 200:
                    failures.append(r.text)
                    return
                if mode == "fast":
                    sent = r.json()["forecasts"]
            # A worker stores its forecasts just after answering; the actuals may reach the
            # other worker: wait until both of this round's forecasts of s2 are in Redis.
            deadline = time.monotonic() + 10
            while store.zcard(f"{prefix}acc:i:s2") < 2 * (i + 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            actuals = [{"unique_id": f["id"], "ds": ds, "values": [v + 5.0 for v in row]}
                       for f in sent for ds, row in zip(f["timestamps"], f["values"],
                                                        strict=True)]
            actuals.append({"unique_id": "never-forecast", "ds": start, "values": [1.0] * 3})
            actuals.append(actuals[0])
            r = client.post("/v1/actuals", json={"actuals": actuals})
            if r.status_code != 200:
                failures.append(r.text)
                return
            answers.append(r.json())
            i += 1
            time.sleep(0.2)


def test_live_accuracy_row_and_alert_return_data(service: str, prometheus: str,
                                                 prefix: str) -> None:
    board = json.loads(DASHBOARD.read_text())
    live = rows(board)["Live accuracy"]
    assert len(live) >= 5
    exprs = [t["expr"].replace("$__rate_interval", "20s") for p in live for t in p["targets"]]
    groups = yaml.safe_load((RULES / "distilcast.yml").read_text())["groups"]
    alert_expr = next(r["expr"] for g in groups for r in g["rules"] if r["alert"] == ALERT)
    stop = threading.Event()
    answers: list[dict[str, Any]] = []
    failures: list[str] = []
    worker = threading.Thread(target=forecasts_then_actuals,
                              args=(service, prefix, stop, answers, failures))
    worker.start()
    empty = [*exprs, alert_expr]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not failures:
            time.sleep(2)
            empty = [e for e in (*exprs, alert_expr) if not query(prometheus, e)]
            if not empty:
                break
    finally:
        stop.set()
        worker.join(timeout=15)
    assert not failures, failures
    assert not empty, f"live-accuracy expressions with no data: {empty}"
    # Two workers, one Redis: every actual of a forecast matched, whichever worker took it.
    assert answers
    per_round = 2 * 2 * H  # two series x two modes x H hours
    for a in answers:
        assert (a["matched"], a["unmatched"], a["pairs"]) == (2 * H, 1, per_round)
        assert a["duplicates"] == 2  # the repeated actual, once per mode
    # The alert selects the student (live MSE 25 against 1.5 x validation 0.36), not the
    # ensemble, whose manifest records no validation MSE.
    selected = query(prometheus, alert_expr)
    assert {(s["metric"]["model"], s["metric"]["version"]) for s in selected} == {(NAME, "1")}
    mse = query(prometheus, f'sum(rate(distilcast_live_squared_error_total{{model="{NAME}"}}[1m]))'
                f' / sum(rate(distilcast_live_points_total{{model="{NAME}"}}[1m]))')
    assert float(mse[0]["value"][1]) == pytest.approx(25.0, rel=1e-3)  # type: ignore[index]
    rules = [r for g in httpx.get(f"{prometheus}/api/v1/rules", timeout=10.0).json()["data"][
        "groups"] for r in g["rules"]]
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10.0).json()["data"]["alerts"]
    live_alerts = [a for a in alerts if a["labels"]["alertname"] == ALERT]
    assert [(a["labels"]["model"], a["state"]) for a in live_alerts] == [(NAME, "pending")]
