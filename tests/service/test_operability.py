"""Running the service blind: JSON logs with request ids, the promotion gate over the admin API,
per-version metadata and readiness, and the local /docs page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from models_registry.store import FilesystemStore
from tests.service.conftest import (
    HORIZON,
    LOOKBACK,
    NAME,
    TOKEN,
    make_registry,
    serving,
    wait_for,
    window,
)
from tests.service.onnx_models import linear_bytes, manifest
from tests.service.test_launch_and_config import ROOT, free_port

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _register(store: FilesystemStore, test_mse: float, w_last: float = 2.0) -> int:
    m = store.register(
        manifest(NAME, "student", LOOKBACK, HORIZON, architecture="scaled", test_mse=test_mse),
        linear_bytes(LOOKBACK, HORIZON, w_last=w_last),
    )
    return m.version


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


@pytest.mark.slow
def test_launched_service_logs_json_with_request_ids(tmp_path: Path) -> None:
    store = make_registry(tmp_path / "registry")
    v2 = _register(store, test_mse=0.4)
    port = free_port()
    log_path = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DISTILCAST_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({
        "HOST": "127.0.0.1", "PORT": str(port), "PYTHON": sys.executable,
        "DISTILCAST_REGISTRY_ROOT": str(tmp_path / "registry"),
        "DISTILCAST_ADMIN_TOKEN": TOKEN, "DISTILCAST_SHADOW_FRACTION": "0",
        "DISTILCAST_ACCESS_LOG": "true", "WORKERS": "2", "DISTILCAST_ALIAS_REFRESH_S": "1",
    })
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as stderr:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "launch_service.sh")], env=env,
                                cwd=ROOT, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as c:
            body = {"model": NAME, "series": [{"id": "a", "values": window()}]}
            r = c.post("/v1/forecast", json=body, headers={"X-Request-ID": "fc-0001"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "fc-0001"
            r = c.post("/v1/forecast", json=body)  # no id sent: one is made up and returned
            generated = r.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
            r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": v2},
                      headers={**AUTH, "X-Request-ID": "promote-42"})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == "promote-42"
            wait_for(lambda: "release" in log_path.read_text())
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    # Every line is JSON: the app's, the workers' uvicorn lines, the supervisor's.
    records = _json_lines(log_path.read_text())
    assert {"time", "level", "logger", "message", "request_id"} <= set(records[0])
    assert any("parent process" in r["message"] for r in records)
    promote = [r for r in records if r.get("event") == "promote"]
    assert len(promote) == 1
    assert (promote[0]["old_version"], promote[0]["new_version"]) == (1, v2)
    assert promote[0]["request_id"] == "promote-42" and promote[0]["model"] == NAME
    assert promote[0]["actor"] == "api:promote-42"
    swaps = [r for r in records if r.get("event") == "swap" and r.get("alias") == "production"
             and r.get("old_version") == 1]
    assert swaps and swaps[0]["new_version"] == v2
    loads = {(r["model"], r["version"]) for r in records if r.get("event") == "load"}
    assert (NAME, 1) in loads and (NAME, v2) in loads
    assert any(r.get("event") == "release" and r["version"] == 1 for r in records)
    access = [r for r in records if r.get("event") == "access"]
    assert {"fc-0001", generated, "promote-42"} <= {r["request_id"] for r in access}
    fc = next(r for r in access if r["request_id"] == "fc-0001")
    assert (fc["method"], fc["path"], fc["status"]) == ("POST", "/v1/forecast", 200)
    assert any(r["logger"].startswith("uvicorn") for r in records)


def test_request_id_echoed_on_every_answer(client: httpx.Client) -> None:
    r = client.post("/v1/forecast", json={"model": NAME, "series": [{"id": "a", "values": [1]}]},
                    headers={"X-Request-ID": "bad-input-7"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "bad-input-7"
    r = client.get("/v1/models/nope", headers={"X-Request-ID": "nf-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "nf-1"
    # An id that could break a log line is replaced, not echoed.
    r = client.get("/healthz", headers={"X-Request-ID": "a b\"c"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r = client.get("/healthz", headers={"X-Request-ID": "x" * 200})
    assert len(r.headers["x-request-id"]) == 32


def test_promotion_gate_over_the_admin_api(fresh_registry: tuple[Path, FilesystemStore]) -> None:
    root, store = fresh_registry
    worse = _register(store, test_mse=0.9)  # val_mse 0.81 against production's 0.36
    with serving(registry_root=root / "registry") as s, s.client() as c:
        url = f"/v1/models/{NAME}/aliases/production"
        r = c.put(url, json={"version": worse}, headers=AUTH)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["field"] == "version" and "0.81" in err["message"]
        assert "0.36" in err["message"] and "force" in err["message"]
        assert c.post("/v1/forecast", json={"model": NAME, "series": [
            {"id": "a", "values": window()}]}).json()["version"] == 1

        r = c.put(url, json={"version": worse, "force": True},
                  headers={**AUTH, "X-Request-ID": "ops-force"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["forced"] and out["gate"]["passed"] is False
        assert out["gate"]["candidate"] == pytest.approx(0.81)
        assert out["gate"]["current"] == pytest.approx(0.36)

        history = c.get(f"/v1/models/{NAME}/history").json()["changes"]
        prod = [h for h in history if h["alias"] == "production"]
        assert [(h["previous"], h["version"], h["forced"]) for h in prod] == [
            (None, 1, False), (1, worse, True)]
        assert prod[-1]["actor"] == "api:ops-force"
        assert prod[-1]["gate"]["current_version"] == 1
        assert c.get("/v1/models/nope/history").status_code == 404


def test_staging_is_served_on_request_not_loaded_eagerly(
    fresh_registry: tuple[Path, FilesystemStore],
) -> None:
    root, store = fresh_registry
    v2 = _register(store, test_mse=0.4)  # registration put it on staging
    with serving(registry_root=root / "registry", alias_refresh_s=0.2) as s, s.client() as c:
        pool = s.services.pool
        assert pool.get((NAME, v2)) is None  # not loaded at start
        body = {"model": f"{NAME}@staging", "series": [{"id": "a", "values": window()}]}
        r = c.post("/v1/forecast", json=body)
        assert r.status_code == 200 and r.json()["version"] == v2
        assert pool.get((NAME, v2)) is not None
        # A broken registration lands on staging: nothing tries to load it until asked, and
        # then the request is refused while production keeps serving.
        broken = store.register(
            manifest(NAME, "student", LOOKBACK, HORIZON, architecture="broken"), b"not onnx"
        ).version
        wait_for(lambda: pool.view(NAME).aliases.get("staging") == broken)
        assert pool.failed.get((NAME, broken)) is None
        r = c.post("/v1/forecast", json=body)
        assert r.status_code == 503 and r.json()["error"]["field"] == "model"
        assert c.post("/v1/forecast", json={**body, "model": NAME}).json()["version"] == 1


def test_version_card_and_model_readiness(client: httpx.Client) -> None:
    r = client.get(f"/v1/models/{NAME}/versions/1")
    assert r.status_code == 200, r.text
    card = r.json()
    assert (card["name"], card["version"], card["kind"]) == (NAME, 1, "student")
    assert card["frequency"] == "h" and card["features"] == "M"
    assert (card["lookback"], card["horizon"]) == (LOOKBACK, HORIZON)
    assert card["inputs"] == [{"name": "x", "shape": ["batch", LOOKBACK, "channels"],
                               "datatype": "FP32"}]
    assert card["outputs"][0]["shape"] == ["batch", HORIZON, "channels"]
    assert card["teachers"] == [f"{NAME}-ensemble@1"]
    assert card["metrics"]["test_mse"] == 0.4 and card["dataset"]["name"] == "ETTh1"
    assert card["lineage"]["seed"] == 0 and card["lineage"]["data_file"] == "ETTh1.csv"
    assert card["aliases"] == ["production", "staging"] and card["loaded"] is True
    assert client.get(f"/v1/models/{NAME}/versions/9").status_code == 404
    assert client.get("/v1/models/nope/versions/1").status_code == 404

    r = client.get(f"/v1/models/{NAME}/ready")
    assert r.status_code == 200
    assert r.json() == {"name": NAME, "ready": True, "versions": [1], "default_version": 1}
    # Teachers are registered but served only inside their ensemble: not ready on their own.
    r = client.get(f"/v1/models/{NAME}-teacher-a/ready")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert client.get("/v1/models/nope/ready").status_code == 404


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def test_docs_page_is_local_and_its_example_runs(client: httpx.Client) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    html = r.text
    assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
    parser = _Links()
    parser.feed(html)
    assert len(parser.urls) >= 3  # the bundle, the stylesheet, the icon
    for url in parser.urls:
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url
    assert "/openapi.json" in html

    spec = client.get("/openapi.json").json()
    for path in ("/v1/forecast", "/v1/forecast/batch"):
        example = spec["paths"][path]["post"]["requestBody"]["content"][
            "application/json"]["example"]
        r = client.post(path, json=example)
        assert r.status_code == 200, (path, r.text)
        assert all("error" not in f for f in r.json()["forecasts"])
    example = spec["paths"]["/v1/forecast"]["post"]["requestBody"]["content"][
        "application/json"]["example"]
    assert len(example["series"][0]["values"]) == LOOKBACK


def test_tracing_spans_when_on(registry_root: Path, capfd: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import opentelemetry.sdk  # noqa: F401  (the otel extra, which scripts/bootstrap.sh installs)

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    with serving(registry_root=registry_root, otel=True) as s, s.client() as c:
        r = c.post("/v1/forecast", json={"model": NAME, "series": [
            {"id": "a", "values": window()}]})
        assert r.status_code == 200
    with serving(registry_root=registry_root) as s, s.client() as c:  # off again: no spans
        c.post("/v1/forecast", json={"model": NAME, "series": [{"id": "b", "values": window()}]})
    out = capfd.readouterr().out
    names = re.findall(r'"name": "([^"]+)"', out)
    assert names.count("decode") == names.count("inference") == names.count("encode") == 1
    assert names.count("/v1/forecast") == 1
