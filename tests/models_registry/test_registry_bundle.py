"""Export and import between registries (models_registry/bundle.py), through the store and the
real `python -m models_registry` command."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from models_registry.bundle import (
    SUMS_FILE,
    ImportRefused,
    export_models,
    import_models,
    verify_export,
)
from models_registry.errors import IntegrityError, ModelNotFound
from models_registry.manifest import ModelRef
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory
from tests.models_registry.test_registry_cli import cli


def family(store: FilesystemStore, make_manifest: ManifestFactory, name: str) -> None:
    """What the pipeline registers: a teacher, its group, the student naming both; plus an
    unaliased older student version and an unrelated model that an export must leave out."""
    teacher = store.register(make_manifest(name=f"{name}-patchtst", kind="teacher"),
                             f"{name}-t".encode())
    group = store.register_group(f"{name}-ensemble", [teacher.ref])
    store.set_alias(group.name, "production", group.version)
    store.register(make_manifest(name=name), f"{name}-old".encode())
    student = store.register(make_manifest(name=name, teachers=[teacher.ref, group.ref]),
                             f"{name}-s".encode())
    store.set_alias(name, "production", student.version, force=True)
    # Version 1 is on no alias once staging moves on: it stays out of an export.
    store.set_alias(name, "staging", student.version)


def tree(root: Path) -> dict[str, str]:
    """Every file under root (lock files aside) with its sha256: 'untouched' means equal."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def source(tmp_path: Path, make_manifest: ManifestFactory) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "source")
    family(store, make_manifest, "etth1-h96")
    family(store, make_manifest, "etth2-h96")
    store.register(make_manifest(name="unrelated"), b"u")
    return store


def test_export_takes_the_aliased_versions_and_what_they_reference(
    source: FilesystemStore, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    exported = export_models(source, ["etth1-h96"], out)
    assert exported == {"etth1-h96": [2], "etth1-h96-ensemble": [1], "etth1-h96-patchtst": [1]}
    assert verify_export(out) == []
    sums = (out / SUMS_FILE).read_text()
    assert "etth1-h96/2/model.onnx" in sums and "etth1-h96/1/" not in sums
    # The sums file is sha256sum's format: the system tool checks it too.
    check = subprocess.run(["sha256sum", "--quiet", "-c", SUMS_FILE], cwd=out,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    bundle = FilesystemStore(out)
    assert bundle.aliases("etth1-h96") == {"production": 2, "staging": 2}
    assert bundle.manifest("etth1-h96", 2) == source.manifest("etth1-h96", 2)
    with pytest.raises(ModelNotFound):
        export_models(source, ["missing"], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_import_adds_whole_models_and_is_idempotent(
    source: FilesystemStore, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    export_models(source, ["etth1-h96", "etth2-h96"], out)
    target = FilesystemStore(tmp_path / "target")
    report = import_models(out, target)
    assert sorted(report.added) == sorted(FilesystemStore(out).list_models())
    assert "unrelated" not in target.list_models()
    for name in target.list_models():
        for v in target.list_versions(name):
            assert target.manifest(name, v) == source.manifest(name, v)
    assert target.aliases("etth2-h96") == {"production": 2, "staging": 2}
    assert target.onnx_bytes("etth2-h96", 2) == b"etth2-h96-s"
    assert target.verify() == []
    assert [c.actor for c in target.history("etth1-h96")] == ["import", "import"]
    before = tree(target.root)
    again = import_models(out, target)
    assert again.added == {} and sorted(again.kept) == sorted(report.added)
    assert tree(target.root) == before


def test_a_name_with_other_content_refuses_the_whole_import(
    source: FilesystemStore, tmp_path: Path, make_manifest: ManifestFactory
) -> None:
    out = tmp_path / "export"
    export_models(source, ["etth1-h96", "etth2-h96"], out)
    target = FilesystemStore(tmp_path / "target")
    target.register(make_manifest(name="etth1-h96-patchtst", kind="teacher"), b"mine")
    for payload in (b"mine-1", b"mine-2"):
        target.register(make_manifest(name="etth1-h96", metrics={"val_mse": 0.3}), payload)
    target.set_alias("etth1-h96", "production", 2)
    before = tree(target.root)
    with pytest.raises(ImportRefused, match="etth1-h96: version 2 differs .*metrics") as err:
        import_models(out, target)
    assert "etth1-h96-patchtst: version 1 differs" in str(err.value)
    assert "Nothing was imported" in str(err.value)
    assert tree(target.root) == before  # etth2-h96 was not added either
    # --if-empty (what serve.sh runs) does not even look at a registry holding models.
    assert import_models(out, target, if_empty=True).skipped
    assert tree(target.root) == before


def test_import_refuses_an_export_that_does_not_verify(
    source: FilesystemStore, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    export_models(source, ["etth1-h96"], out)
    target = FilesystemStore(tmp_path / "target")
    onnx = out / "etth1-h96" / "2" / "model.onnx"
    onnx.write_bytes(b"tampered")
    assert any("etth1-h96/2/model.onnx: sha256" in p for p in verify_export(out))
    with pytest.raises(IntegrityError, match="model.onnx"):
        import_models(out, target)
    assert target.list_models() == []
    onnx.write_bytes(b"etth1-h96-s")
    (out / "etth1-h96" / "stray.txt").write_text("x")
    assert verify_export(out) == [f"etth1-h96/stray.txt: not listed in {SUMS_FILE}"]


def test_cli_export_and_import(source: FilesystemStore, tmp_path: Path) -> None:
    out = tmp_path / "export"
    r = cli(source.root, "export", "--names", "etth1-h96,etth2-h96", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "exported etth1-h96@2" in r.stdout and "ok: 6 version(s) of 6 model(s)" in r.stdout
    r = cli(source.root, "export", "--names", "etth1-h96", "--out", str(out))
    assert r.returncode == 1 and "not an empty folder" in r.stderr
    target = tmp_path / "target"
    r = cli(target, "import", str(out))
    assert r.returncode == 0, r.stderr
    assert "added etth1-h96-ensemble@1" in r.stdout and "6 model(s) added" in r.stdout
    assert FilesystemStore(target).manifest("etth1-h96", 2).teachers == [
        ModelRef(name="etth1-h96-patchtst", version=1),
        ModelRef(name="etth1-h96-ensemble", version=1),
    ]
    r = cli(target, "import", "--if-empty", str(out))
    assert r.returncode == 0 and "import skipped" in r.stdout
    (out / "etth1-h96" / "2" / "model.onnx").write_bytes(b"tampered")
    r = cli(tmp_path / "fresh", "import", str(out))
    assert r.returncode == 1 and "sha256" in r.stderr
