"""Security: admin tokens, traversal in names, the serving import graph, the runtime user."""

from __future__ import annotations

from pathlib import Path

from tests.reliability import scenarios, security
from tests.reliability.harness import Lengths
from tests.reliability.test_faults import ok


def test_the_service_imports_no_torch_training_or_unpickling_library() -> None:
    modules = security.service_modules()
    assert "service.app" in modules and "onnxruntime" in modules
    assert security.forbidden_loaded(modules) == []
    # numpy imports pickle for np.load; the project's serving modules never do.
    assert security.forbidden_project_imports(modules) == []


def test_sources_never_mention_pickle_torch_load_or_joblib() -> None:
    assert security.source_hits() == []


def test_the_checks_would_catch_a_violation(tmp_path: Path) -> None:
    assert security.SOURCE_PATTERN.search("state = torch.load(path)")
    assert security.SOURCE_PATTERN.search("import pickle")
    assert security.SOURCE_PATTERN.search("np.load(f, allow_pickle=True)")
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom pickle import loads\n")
    assert [m for _, m in security._imports(bad)] == ["json", "pickle"]
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM a AS b\nUSER app\nFROM python:3.11-slim\nRUN true\n")
    assert not security.non_root(security.final_stage(dockerfile).user)  # no USER: root
    dockerfile.write_text("FROM a\nUSER 0:0\n")
    assert not security.non_root(security.final_stage(dockerfile).user)


def test_the_service_image_runs_as_a_non_root_user() -> None:
    stage = security.final_stage(security.REPO / "docker" / "service.Dockerfile")
    assert security.non_root(stage.user), stage
    assert stage.base.startswith("python:")


def test_admin_tokens_and_traversal_over_http(tmp_path: Path, lengths: Lengths) -> None:
    record = scenarios.security_checks(tmp_path, lengths)
    ok(record)
    assert record["requests"] > 50
