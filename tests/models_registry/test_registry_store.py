from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from models_registry.errors import (
    AliasNotFound,
    IntegrityError,
    InvalidName,
    ModelNotFound,
    RegistryError,
    VersionNotFound,
)
from models_registry.manifest import ModelRef
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory

ONNX = b"not really onnx, but bytes are bytes"


def test_round_trip(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    registered = store.register(make_manifest(), ONNX)
    assert registered.version == 1
    assert registered.sha256 == hashlib.sha256(ONNX).hexdigest()
    assert registered.created_at is not None and registered.created_at.tzinfo is not None

    assert store.list_models() == ["student-etth1"]
    assert store.list_versions("student-etth1") == [1]
    assert store.manifest("student-etth1", 1) == registered
    assert store.onnx_bytes("student-etth1", 1) == ONNX
    vdir = store.root / "student-etth1" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["manifest.json", "model.onnx"]
    assert json.loads((vdir / "manifest.json").read_text())["version"] == 1
    # nothing temporary is left behind
    assert not [p for p in (store.root / "student-etth1").iterdir() if p.name.startswith(".tmp")]


def test_versions_are_numbered_monotonically(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    versions = [store.register(make_manifest(), ONNX + bytes([i])).version for i in range(3)]
    assert versions == [1, 2, 3]
    store.gc(keep=1)
    assert store.list_versions("student-etth1") == [3]
    assert store.register(make_manifest(), ONNX).version == 4  # never reused


def test_register_refuses_bad_input(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    with pytest.raises(RegistryError):
        store.register(make_manifest(), b"")
    with pytest.raises(IntegrityError):
        store.register(make_manifest(sha256="0" * 64), ONNX)
    # a name holds models or groups, never both
    store.register(make_manifest(), ONNX)
    store.register_group("ens", [ModelRef(name="student-etth1", version=1)])
    with pytest.raises(RegistryError, match="holds"):
        store.register(make_manifest(name="ens"), ONNX)


def test_corrupted_byte_is_refused(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    m = store.register(make_manifest(), ONNX)
    path = store.root / "student-etth1" / "1" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        store.onnx_bytes("student-etth1", 1)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    message = str(info.value)
    assert str(path) in message and m.sha256 is not None
    assert m.sha256 in message and actual in message
    assert [str(p) for p in store.verify()] == [f"student-etth1@1: {message}"]
    # promoting a corrupt artifact is refused too
    with pytest.raises(IntegrityError):
        store.set_alias("student-etth1", "production", 1)


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc", "..", ".hidden", "A"])
def test_path_traversal_is_refused(store: FilesystemStore, name: str) -> None:
    with pytest.raises(InvalidName):
        store.manifest(name, 1)
    with pytest.raises(InvalidName):
        store.resolve(f"{name}@1")
    with pytest.raises(InvalidName):
        store.register_group(name, [ModelRef(name="x", version=1)])
    assert not (store.root.parent / "escape").exists()


def test_symlinks_out_of_root_are_refused(
    store: FilesystemStore, make_manifest: ManifestFactory, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "manifest.json").write_text("{}")
    store.root.mkdir(parents=True)
    os.symlink(outside, store.root / "sneaky")
    with pytest.raises(InvalidName, match="escapes"):
        store.manifest("sneaky", 1)
    assert store.list_models() == []
    assert [p.name for p in store.verify()] == ["sneaky"]
    assert store.gc(keep=1) == []
    # a file inside a legitimate version directory pointing outside is refused too
    store.register(make_manifest(), ONNX)
    manifest = store.root / "student-etth1" / "1" / "manifest.json"
    manifest.unlink()
    os.symlink(outside / "manifest.json", manifest)
    with pytest.raises(InvalidName, match="escapes"):
        store.manifest("student-etth1", 1)


def test_aliases_and_resolve(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    for i in range(3):
        store.register(make_manifest(), ONNX + bytes([i]))
    name = "student-etth1"
    assert store.aliases(name) == {"staging": 3}  # registering puts the new version on staging
    assert store.resolve(name) == (name, 3)  # no production alias: latest
    assert store.set_alias(name, "production", 1) is None
    assert store.set_alias(name, "staging", 2) == 3
    assert store.set_alias(name, "production", 2) == 1
    assert store.aliases(name) == {"production": 2, "staging": 2}
    on_disk = json.loads((store.root / name / "aliases.json").read_text())
    assert on_disk == {"production": 2, "staging": 2}

    assert store.resolve(name) == (name, 2)
    assert store.resolve(f"{name}@staging") == (name, 2)
    assert store.resolve(f"{name}@3") == (name, 3)
    with pytest.raises(AliasNotFound):
        store.resolve(f"{name}@canary")
    with pytest.raises(VersionNotFound):
        store.resolve(f"{name}@9")
    with pytest.raises(VersionNotFound):
        store.set_alias(name, "production", 9)
    with pytest.raises(InvalidName):
        store.set_alias(name, "42", 1)
    with pytest.raises(ModelNotFound):
        store.resolve("nobody")
    # the not-found family shares one base, so the service maps them in one place
    assert issubclass(VersionNotFound, ModelNotFound) and issubclass(AliasNotFound, ModelNotFound)


def test_register_group(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    a = store.register(make_manifest(name="teacher-a", kind="teacher"), b"a")
    b = store.register(make_manifest(name="teacher-b", kind="teacher", channels=7), b"b")
    group = store.register_group("teachers", [a.ref, b.ref], metrics={"val_mse": 0.3})
    assert (group.kind, group.version, group.sha256) == ("ensemble", 1, None)
    assert (group.lookback, group.horizon, group.channels) == (8, 4, 7)
    assert group.members == [a.ref, b.ref]
    assert not (store.root / "teachers" / "1" / "model.onnx").exists()
    with pytest.raises(RegistryError, match="ensemble group"):
        store.onnx_bytes("teachers", 1)
    store.set_alias("teachers", "production", 1)

    with pytest.raises(VersionNotFound):
        store.register_group("teachers", [ModelRef(name="teacher-a", version=5)])
    with pytest.raises(RegistryError, match="itself an ensemble"):
        store.register_group("nested", [group.ref])
    with pytest.raises(RegistryError, match="disagrees"):
        store.register_group("teachers", [a.ref], lookback=16)
    other = store.register(make_manifest(name="teacher-c", kind="teacher", horizon=8), b"c")
    with pytest.raises(RegistryError, match="horizon"):
        store.register_group("teachers", [a.ref, other.ref])


def test_gc_keeps_aliased_versions_and_group_members(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    for i in range(4):
        store.register(make_manifest(name="teacher-a", kind="teacher"), bytes([i]))
        store.register(make_manifest(name="student"), bytes([i]))
    store.set_alias("student", "production", 1)
    group = store.register_group("ens", [ModelRef(name="teacher-a", version=2)])
    store.register_group("ens", [ModelRef(name="teacher-a", version=4)])
    store.set_alias("ens", "production", group.version)

    assert [str(r) for r in store.gc(keep=1, dry_run=True)] == [
        "student@2",
        "student@3",
        "teacher-a@1",
        "teacher-a@3",
    ]
    assert store.list_versions("student") == [1, 2, 3, 4]  # dry run touched nothing
    store.gc(keep=1)
    assert store.list_versions("student") == [1, 4]  # aliased 1, newest 4
    assert store.list_versions("teacher-a") == [2, 4]  # members of the aliased and newest groups
    assert store.list_versions("ens") == [1, 2]
    assert store.verify() == []
    with pytest.raises(ValueError):
        store.gc(keep=0)


def test_verify_reports_broken_references(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    store.register(make_manifest(), ONNX)
    store.register(make_manifest(), ONNX)
    store.set_alias("student-etth1", "production", 2)
    store.register_group("ens", [ModelRef(name="student-etth1", version=1)])
    # simulate damage done behind the registry's back
    (store.root / "student-etth1" / "2" / "model.onnx").unlink()
    (store.root / "student-etth1" / "1" / "manifest.json").write_text("{not json")
    problems = [str(p) for p in store.verify()]
    assert len(problems) == 3, problems
    assert any(p.startswith("ens@1: member student-etth1@1") for p in problems)
    assert any(p.startswith("student-etth1@1: ") and "invalid manifest" in p for p in problems)
    assert any(p.startswith("student-etth1@2: ") and "file missing" in p for p in problems)
    with pytest.raises(ModelNotFound):
        store.verify("nobody")


def test_store_id_is_stable(store: FilesystemStore) -> None:
    first = store.store_id
    assert FilesystemStore(store.root).store_id == first
    assert len(first) == 32
