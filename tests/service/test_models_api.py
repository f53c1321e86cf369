"""GET /v1/models[/{name}], the admin alias route, health, metrics and OpenAPI."""

from __future__ import annotations

import httpx

from service.api.schemas import BatchIn, BatchWire, ForecastIn, ForecastWire, SeriesIn, SeriesWire
from tests.service.conftest import NAME, TOKEN
from tests.service.onnx_models import FIXTURE_LINEAGE


def test_list_models(client: httpx.Client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {NAME, f"{NAME}-ensemble", "fixed7"}  # teachers serve as members
    student = models[NAME]
    # Registering put version 1 on staging; the fixture promoted it to production.
    assert student["kind"] == "student"
    assert student["aliases"] == {"production": 1, "staging": 1}
    assert student["default_version"] == 1 and student["metrics"]["test_mse"] == 0.4
    assert student["loaded"][0]["provider"] == "CPUExecutionProvider"
    ensemble = models[f"{NAME}-ensemble"]
    assert ensemble["loaded"][0]["members"] == [f"{NAME}-teacher-a@1", f"{NAME}-teacher-b@1"]


def test_get_model(client: httpx.Client) -> None:
    r = client.get(f"/v1/models/{NAME}")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "student" and out["aliases"] == {"production": 1, "staging": 1}
    v = out["versions"][0]
    assert v["loaded"] and v["provider"] == "CPUExecutionProvider"
    assert v["teachers"] == [f"{NAME}-ensemble@1"] and v["calibration_levels"][0] == 50
    assert out["serving"] == {"default": 1, "aliases": {"production": 1, "staging": 1}}
    # The model card: the default version's lineage and metrics.
    card = out["card"]
    assert (card["version"], card["aliases"], card["loaded"]) == (1, ["production", "staging"],
                                                                   True)
    assert card["metrics"]["val_mse"] == v["metrics"]["val_mse"] and card["metrics"]["test_mse"]
    assert card["lineage"] == FIXTURE_LINEAGE.model_dump(mode="json")
    assert card["teachers"] == [f"{NAME}-ensemble@1"]
    # A manifest without lineage (older than it) still has a card, with lineage null.
    group = client.get(f"/v1/models/{NAME}-ensemble").json()["card"]
    assert group["lineage"] is None and group["members"] == [f"{NAME}-teacher-a@1",
                                                              f"{NAME}-teacher-b@1"]
    # Teachers are not served on their own, but their manifests are visible.
    assert client.get(f"/v1/models/{NAME}-teacher-a").json()["kind"] == "teacher"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["field"] == "name"


def test_admin_route_needs_the_token(client: httpx.Client) -> None:
    url = f"/v1/models/{NAME}/aliases/staging"
    r = client.put(url, json={"version": 1})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["field"] == "Authorization"
    r = client.put(url, json={"version": 1}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    r = client.put(url, json={"version": 1}, headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.put(url, json={"version": 0}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "version"


def test_health(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["models"][NAME] == 1


def test_metrics_exported(client: httpx.Client) -> None:
    client.post("/v1/forecast", json={"series": [{"id": "a", "values": [1.0]}]})  # 422
    text = client.get("/metrics").text
    for name in ("distilcast_request_duration_seconds_bucket", "distilcast_requests_in_flight",
                 "distilcast_inference_duration_seconds_bucket", "distilcast_batch_rows_bucket",
                 "distilcast_queue_wait_seconds_bucket", "distilcast_model_loaded",
                 "distilcast_registry_cache_total", "distilcast_model_loads_total",
                 "distilcast_registry_cache_available"):
        assert name in text, name
    assert 'provider="CPUExecutionProvider"' in text
    assert 'status="422"' in text
    assert "summary" not in text.replace("distilcast", "")  # histograms only


def test_openapi_documents_the_bodies(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("ForecastIn", "BatchIn", "SeriesIn", "ForecastOut", "BatchOut", "ErrorOut",
                 "ModelsOut", "ModelOut", "AliasIn", "AliasOut"):
        assert name in schemas, name
    post = spec["paths"]["/v1/forecast"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ForecastIn")
    assert "422" in post["responses"] and "503" in post["responses"]
    assert "/v1/models/{name}/aliases/{alias}" in spec["paths"]


def test_doc_models_match_the_wire_structs() -> None:
    for doc, wire in ((ForecastIn, ForecastWire), (BatchIn, BatchWire), (SeriesIn, SeriesWire)):
        assert set(doc.model_fields) == set(wire.__struct_fields__), doc.__name__
