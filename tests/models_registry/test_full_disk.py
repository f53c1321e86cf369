"""The store on a filesystem that runs out of space (a real tmpfs, mounted by the test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models_registry.errors import StorageFull
from models_registry.store import FilesystemStore
from tests.reliability.harness import FileSystemUnavailable, fill, small_filesystem
from tests.service.onnx_models import build_family, linear_bytes, manifest

NAME = "full-h8"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    try:
        with small_filesystem(tmp_path / "disk", 1024) as path:
            yield path
    except FileSystemUnavailable as exc:
        pytest.skip(str(exc))


def test_a_full_disk_refuses_register_and_promote_and_changes_nothing(disk: Path) -> None:
    store = FilesystemStore(disk / "registry")
    build_family(store, NAME, 32, 8)
    v2 = store.register(manifest(NAME, "student", 32, 8, architecture="2x-last"),
                        linear_bytes(32, 8, w_last=2.0))
    aliases, history = store.aliases(NAME), store.history(NAME)
    assert aliases["production"] == 1
    fill(disk)
    with pytest.raises(StorageFull, match="no space left on the registry's filesystem"):
        store.register(manifest(NAME, "student", 32, 8, architecture="3x-last"),
                       linear_bytes(32, 8, w_last=3.0) + b"\0" * 4096)
    assert store.list_versions(NAME) == [1, v2.version]
    assert not [p.name for p in (disk / "registry" / NAME).iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(StorageFull, match="nothing was changed"):
        store.set_alias(NAME, "production", v2.version, force=True)
    assert store.aliases(NAME) == aliases
    assert store.history(NAME) == history
    assert not [p.name for p in (disk / "registry" / NAME).iterdir() if p.name.startswith(".tmp")]
    (disk / "filler").unlink()  # space again: the same promotion goes through
    store.set_alias(NAME, "production", v2.version, force=True)
    assert store.aliases(NAME)["production"] == v2.version
