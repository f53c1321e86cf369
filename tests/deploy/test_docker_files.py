"""The Dockerfiles and compose stack, checked by parsing them (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
LAUNCH = "scripts/launch_service.sh"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    return ins[starts[-1] :]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.mark.parametrize("name", ["service.Dockerfile", "service-gpu.Dockerfile"])
def test_service_images_run_the_readme_launch_script_as_non_root(name: str) -> None:
    ins = last_stage(instructions(DOCKER / name))
    users = [arg for w, arg in ins if w == "USER"]
    assert users and users[-1] not in {"root", "0"}, "runtime stage must end as a non-root user"
    cmd = [arg for w, arg in ins if w == "CMD"][-1]
    assert json.loads(cmd) == ["bash", LAUNCH]
    health = [arg for w, arg in ins if w == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]
    assert (REPO / LAUNCH).is_file()
    # The README's main command ends by exec'ing the same launch script.
    assert f"exec bash {LAUNCH}" in (REPO / "scripts" / "serve.sh").read_text()


def test_cpu_service_image_is_multi_stage_without_torch() -> None:
    ins = instructions(DOCKER / "service.Dockerfile")
    assert sum(w == "FROM" for w, _ in ins) >= 2
    runs = " ".join(arg for w, arg in ins if w == "RUN")
    assert "torch" not in runs and "[train" not in runs


def test_gpu_image_uses_cuda_runtime_and_onnxruntime_gpu() -> None:
    ins = instructions(DOCKER / "service-gpu.Dockerfile")
    assert "nvidia/cuda" in [arg for w, arg in ins if w == "FROM"][0]
    runs = " ".join(arg for w, arg in ins if w == "RUN")
    # The GPU build of the same ONNX Runtime release as the CPU pin, with the CUDA/cuDNN runtime
    # wheels its extras bring, pinned by the constraints file the image copies.
    cpu_pin = re.search(r'"onnxruntime==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert cpu_pin is not None
    assert f'"onnxruntime-gpu[cuda,cudnn]=={cpu_pin.group(1)}"' in runs
    assert "-c gpu-constraints.txt" in runs
    assert any(w == "COPY" and "docker/gpu-constraints.txt" in a for w, a in ins)
    pins = (DOCKER / "gpu-constraints.txt").read_text()
    assert f"onnxruntime-gpu=={cpu_pin.group(1)}" in pins


def test_training_image_installs_torch_and_builds_the_default_model() -> None:
    ins = instructions(DOCKER / "training.Dockerfile")
    assert '".[train]"' in " ".join(arg for w, arg in ins if w == "RUN")
    assert json.loads([a for w, a in ins if w == "CMD"][-1]) == [
        "bash",
        "scripts/build_default_model.sh",
    ]
    assert [a for w, a in ins if w == "USER"][-1] not in {"root", "0"}


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var", "runs"} <= set(ignored)


def test_compose_services_healthchecks_volumes_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "service", "prometheus", "grafana", "train", "proxy", "service-gpu"} <= set(
        services
    )
    for name in ("redis", "service", "prometheus", "grafana", "proxy", "service-gpu"):
        assert "test" in services[name]["healthcheck"], name
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "redis-data:/data" in services["redis"]["volumes"]
    svc = services["service"]
    assert "registry:/var/lib/distilcast/registry" in svc["volumes"]
    assert svc["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # Replicas are not published (so --scale works); the proxy is the one entry point.
    assert "ports" not in svc and svc["expose"] == ["8000"]
    assert any(p.endswith(":8000") for p in services["proxy"]["ports"])
    assert services["service-gpu"]["profiles"] == ["gpu"]
    gpu = services["service-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["train"]["build"]["dockerfile"] == "docker/training.Dockerfile"
    assert set(compose["volumes"]) >= {"registry", "redis-data", "prometheus-data", "grafana-data"}
    for name in ("service", "service-gpu", "train"):
        build = services[name]["build"]
        assert (REPO / build["dockerfile"]).is_file()
    for name in ("proxy", "prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_service_environment_is_documented(compose: dict[str, Any]) -> None:
    ops = (REPO / "docs" / "operations.md").read_text()
    for key in compose["services"]["service"]["environment"]:
        assert key in ops, f"{key} is not documented in docs/operations.md"


def test_prometheus_scrapes_every_replica() -> None:
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    sd = jobs["distilcast"]["dns_sd_configs"][0]
    assert sd["names"] == ["service"] and sd["type"] == "A" and sd["port"] == 8000


# Fields of Grafana's provisioning files as documented (administration/provisioning).
DATASOURCE_FIELDS = {
    "name",
    "type",
    "uid",
    "access",
    "url",
    "isDefault",
    "editable",
    "jsonData",
    "orgId",
    "basicAuth",
    "secureJsonData",
    "version",
    "user",
    "database",
    "withCredentials",
}
PROVIDER_FIELDS = {
    "name",
    "orgId",
    "folder",
    "folderUid",
    "type",
    "disableDeletion",
    "updateIntervalSeconds",
    "allowUiUpdates",
    "options",
}


def test_grafana_provisioning_files_follow_the_documented_schema() -> None:
    prov = DOCKER / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and set(ds) <= {"apiVersion", "datasources", "deleteDatasources"}
    for source in ds["datasources"]:
        assert set(source) <= DATASOURCE_FIELDS
        assert source["type"] == "prometheus" and source["access"] in {"proxy", "direct"}
    dash = yaml.safe_load((prov / "dashboards" / "distilcast.yml").read_text())
    assert dash["apiVersion"] == 1 and set(dash) == {"apiVersion", "providers"}
    for provider in dash["providers"]:
        assert set(provider) <= PROVIDER_FIELDS and provider["type"] == "file"
        assert set(provider["options"]) <= {"path", "foldersFromFilesStructure"}
    # The dashboards folder mounted by compose is the one the provider reads.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{dash['providers'][0]['options']['path']}:ro" in mounts
    uid = ds["datasources"][0]["uid"]
    board = json.loads((DOCKER / "grafana" / "dashboards" / "distilcast.json").read_text())
    panels = [p for panel in board["panels"] for p in (
        panel.get("panels", []) if panel["type"] == "row" else [panel])]  # rows hold no query
    assert len(panels) >= 12
    for panel in panels:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
