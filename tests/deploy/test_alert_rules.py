"""Alert rules: valid for promtool, each alert unit-tested on series that should fire it, wired into
prometheus.yml and the compose stack; and the public nginx port hides /metrics and admin routes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.strict import missing

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "docker" / "prometheus" / "rules"
ALERTS = {
    "DistilcastHighErrorRate", "DistilcastP99LatencyOverBudget", "DistilcastNoModelLoaded",
    "DistilcastRedisDisconnected", "DistilcastShadowGapGrowing", "DistilcastReplicaDown",
    "DistilcastLiveErrorAboveValidation",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    missing("prometheus", "promtool (Debian's prometheus package) is not installed")


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES / "distilcast.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_promtool_unit_tests_fire_the_alerts() -> None:
    out = subprocess.run([promtool(), "test", "rules", "distilcast.test.yml"],
                         cwd=RULES.parent / "tests", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_cover_the_issue_and_are_wired() -> None:
    groups = yaml.safe_load((RULES / "distilcast.yml").read_text())["groups"]
    names = {r["alert"] for g in groups for r in g["rules"]}
    assert names == ALERTS
    metrics = " ".join(r["expr"] for g in groups for r in g["rules"])
    for metric in ("distilcast_request_duration_seconds", "distilcast_model_loaded",
                   "distilcast_registry_cache_available", "distilcast_shadow_gap_zmae",
                   "distilcast_live_squared_error_total", "distilcast_model_validation_error",
                   "distilcast_live_error_alert_factor"):
        assert metric in metrics, metric
    config = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "./docker/prometheus/rules:/etc/prometheus/rules:ro" in (
        compose["services"]["prometheus"]["volumes"])
    # Everything the glob picks up must be a rule file (promtool's unit tests live elsewhere).
    assert [p.name for p in RULES.glob("*.yml")] == ["distilcast.yml"]


def _servers(conf: str) -> dict[str, str]:
    """`listen` port -> the text of its server block (nginx.conf has no nested servers)."""
    out = {}
    for block in re.split(r"\nserver \{", conf)[1:]:
        port = re.search(r"listen (\d+);", block)
        assert port is not None
        out[port.group(1)] = block
    return out


def test_public_port_hides_metrics_and_admin() -> None:
    conf = (REPO / "docker" / "nginx.conf").read_text()
    servers = _servers(conf)
    assert set(servers) == {"8000", "8001"}
    public = servers["8000"]
    assert re.search(r"location = /metrics \{\s*return 404;", public)
    admin = re.search(r"location ~ (\S+) \{\s*return 404;", public)
    assert admin is not None
    pattern = re.compile(admin.group(1))
    assert pattern.search("/v1/models/etth1-h96/aliases/production")
    assert not pattern.search("/v1/models/etth1-h96/versions/1")
    assert "X-Request-ID $distilcast_request_id" in public
    assert "return" not in servers["8001"]  # the operators' port passes everything
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    ports = compose["services"]["proxy"]["ports"]
    assert "127.0.0.1:${DISTILCAST_ADMIN_PORT:-8001}:8001" in ports  # loopback only
    assert not any(p.endswith(":8001") and not p.startswith("127.0.0.1:") for p in ports)
