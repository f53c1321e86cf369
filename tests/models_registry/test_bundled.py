"""The bundle shipped with the code (models_registry/bundled/) and the import serve.sh runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from models_registry.bundle import BUNDLED_DIR, SUMS_FILE, verify_export
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory
from tests.models_registry.test_registry_bundle import tree

REPO = Path(__file__).resolve().parents[2]
IMPORT_SCRIPT = REPO / "scripts" / "import_bundle.sh"
MAX_BYTES = 25 * 1024 * 1024


def test_the_bundle_verifies_and_holds_both_families() -> None:
    assert verify_export(BUNDLED_DIR) == []
    check = subprocess.run(["sha256sum", "--quiet", "-c", SUMS_FILE], cwd=BUNDLED_DIR,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sum(p.stat().st_size for p in BUNDLED_DIR.rglob("*") if p.is_file()) <= MAX_BYTES
    bundle = FilesystemStore(BUNDLED_DIR)
    for name in ("etth1-h96", "etth2-h96"):
        student = bundle.manifest(*bundle.resolve(f"{name}@production"))
        group = bundle.manifest(*bundle.resolve(f"{name}-ensemble@production"))
        assert student.kind == "student" and group.kind == "ensemble" and group.members
        assert group.ref in student.teachers
        for m in (student, group, *(bundle.manifest(r.name, r.version) for r in group.members)):
            assert m.lineage is not None and m.lineage.git_commit and m.lineage.data_sha256
            assert {"val_mse", "test_mse"} <= set(m.metrics), m.ref


def _run_import(root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILCAST_")}
    env["DISTILCAST_REGISTRY_ROOT"] = str(root)
    return subprocess.run(["bash", str(IMPORT_SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_serve_sh_runs_the_import_script() -> None:
    assert "scripts/import_bundle.sh" in (REPO / "scripts" / "serve.sh").read_text()


def test_the_import_leaves_an_existing_registry_untouched(
    tmp_path: Path, make_manifest: ManifestFactory
) -> None:
    root = tmp_path / "registry"
    store = FilesystemStore(root)
    # Even a model under a bundled name, with other content: nothing is compared or written.
    mine = store.register(make_manifest(name="etth1-h96"), b"my own model")
    store.set_alias("etth1-h96", "production", mine.version)
    before = tree(root)
    r = _run_import(root)
    assert r.returncode == 0, r.stderr
    assert "import skipped" in r.stdout
    assert tree(root) == before
    assert store.list_models() == ["etth1-h96"]


def test_the_import_fills_an_empty_registry_once(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    r = _run_import(root)
    assert r.returncode == 0, r.stderr
    store = FilesystemStore(root)
    assert store.list_models() == FilesystemStore(BUNDLED_DIR).list_models()
    assert store.verify() == []
    assert store.resolve("etth2-h96@production") == FilesystemStore(BUNDLED_DIR).resolve(
        "etth2-h96@production")
    before = tree(root)
    r = _run_import(root)
    assert r.returncode == 0 and "import skipped" in r.stdout
    assert tree(root) == before


def test_every_bundled_file_is_package_data() -> None:
    """The serving image installs the package (no repository): the bundle must travel in it."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["models_registry"]
    package = REPO / "models_registry"
    for path in BUNDLED_DIR.rglob("*"):
        if path.is_file():
            rel = path.relative_to(package).as_posix()
            assert any(
                fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns
            ), f"{rel} is not installed with the package (pyproject.toml package-data)"
