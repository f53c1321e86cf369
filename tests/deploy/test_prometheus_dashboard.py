"""A real Prometheus scrapes the service (two uvicorn workers, multiprocess metrics) while traffic
flows, and every PromQL expression of the provisioned Grafana dashboard returns data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models_registry.store import FilesystemStore
from tests.models_registry.conftest import free_port
from tests.service.onnx_models import build_family
from tests.strict import missing

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "distilcast.json"
RULES = REPO / "docker" / "prometheus" / "rules"
L, H = 96, 24


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    missing("prometheus", "prometheus is not installed")


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    build_family(FilesystemStore(tmp_path / "registry"), "etth1-h96", L, H)
    port = free_port()
    env = {
        **os.environ,
        "DISTILCAST_REGISTRY_ROOT": str(tmp_path / "registry"),
        "DISTILCAST_PORT": str(port),
        "DISTILCAST_HOST": "127.0.0.1",
        "DISTILCAST_WORKERS": "2",
        "DISTILCAST_SHADOW_FRACTION": "1.0",
        "DISTILCAST_ALIAS_REFRESH_S": "1",
        "DISTILCAST_MAX_SERIES_PER_REQUEST": "50",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    env.pop("DISTILCAST_REDIS_URL", None)
    proc = subprocess.Popen(
        ["bash", "scripts/launch_service.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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
    target = service.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    # The compose stack's alert rules, loaded as production loads them (rule_files).
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}/*.yml\n"
        "scrape_configs:\n  - job_name: distilcast\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


FORECAST_ROUTES = ("/v1/forecast", "/v1/forecast/batch")


def traffic(base: str, stop: threading.Event, sent: list[int]) -> None:
    """Requests until ``stop``; ``sent[0]`` counts the answered POSTs to the forecast routes (each
    one observed once in ``distilcast_request_duration_seconds``, whatever its status)."""
    window = [[float(i % 24) + c for c in range(3)] for i in range(L)]
    bodies = [
        (
            "/v1/forecast",
            {"model": "etth1-h96", "mode": "fast", "series": [{"id": "a", "values": window}]},
        ),
        (
            "/v1/forecast",
            {"model": "etth1-h96", "mode": "accurate", "series": [{"id": "b", "values": window}]},
        ),
        (
            "/v1/forecast",
            {
                "model": "etth1-h96",
                "mode": "auto",
                "series": [{"id": "c", "values": window}],
                "level": [80, 95],
            },
        ),
        (
            "/v1/forecast/batch",
            {
                "model": "etth1-h96",
                "mode": "fast",
                "series": [{"id": i, "values": window} for i in range(20)],
            },
        ),
        (
            "/v1/forecast",
            {"model": "etth1-h96", "mode": "fast", "series": [{"id": "x", "values": [[1.0]]}]},
        ),
        (
            "/v1/forecast",
            {"model": "nope", "mode": "fast", "series": [{"id": "y", "values": window}]},
        ),
    ]
    with httpx.Client(base_url=base, timeout=10.0) as client:
        while not stop.is_set():
            for path, body in bodies:
                client.post(path, json=body)
                sent[0] += 1
            client.get("/v1/models")
            # Policy rejections: over the series limit (413) and an admin call with no token.
            client.post(
                "/v1/forecast/batch",
                json={
                    "model": "etth1-h96",
                    "series": [{"id": i, "values": window} for i in range(60)],
                },
            )
            sent[0] += 1
            client.put("/v1/models/etth1-h96/aliases/staging", json={"version": 1})


def rows(board: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
    """The dashboard's panels by the row above them (None: above the first row)."""
    out: dict[str | None, list[dict[str, Any]]] = {None: []}
    current: str | None = None
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            out[current] = list(panel.get("panels", []))  # a collapsed row holds its panels
            continue
        out[current].append(panel)
    return out


def query(prom: str, expr: str) -> list[dict[str, object]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10.0)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_every_dashboard_expression_returns_data(service: str, prometheus: str) -> None:
    stop = threading.Event()
    sent = [[0] for _ in range(3)]
    workers = [
        threading.Thread(target=traffic, args=(service, stop, count)) for count in sent
    ]
    for w in workers:
        w.start()
    board = json.loads(DASHBOARD.read_text())
    # The live-accuracy row needs actuals: tests/deploy/test_live_accuracy_dashboard.py.
    exprs = [
        t["expr"].replace("$__rate_interval", "20s")
        for panel in rows(board)[None]
        for t in panel["targets"]
    ]
    try:
        # Both workers must have been scraped through one endpoint, with traffic in the window.
        deadline = time.monotonic() + 90
        empty = exprs
        while time.monotonic() < deadline:
            time.sleep(2)
            empty = [e for e in exprs if not query(prometheus, e)]
            if not empty:
                break
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=15)
    assert not any(w.is_alive() for w in workers)
    assert not empty, f"dashboard expressions with no data: {empty}"
    up = query(prometheus, "up")
    assert up and all(s["value"][1] == "1" for s in up)  # type: ignore[index]
    # Multiprocess mode: the one /metrics endpoint sums both workers' files, so the scraped
    # request count equals the requests sent (one worker's count alone would fall short, a
    # request counted twice would exceed it). Wait for a scrape after the last request.
    total = sum(count[0] for count in sent)
    assert total > 0
    counted = -1.0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = query(prometheus, "sum(distilcast_request_duration_seconds_count)")
        counted = float(result[0]["value"][1]) if result else -1.0  # type: ignore[index]
        if counted == total:
            break
        time.sleep(1)
    assert counted == total, f"Prometheus counted {counted} forecast requests, {total} were sent"
    # The alert rules were loaded and every one evaluates against live data without error.
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10.0).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"DistilcastNoModelLoaded", "DistilcastHighErrorRate"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # A healthy replica with models loaded: the "no model" alert is not even pending.
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10.0).json()["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "DistilcastNoModelLoaded"]
