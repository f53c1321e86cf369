"""Move models between registries: ``export`` a few names to a folder, ``import`` it elsewhere.

An export is a registry layout (``<dir>/<name>/<version>/{manifest.json,model.onnx}``,
``<dir>/<name>/aliases.json``) plus ``SHA256SUMS``, the sha256 of every other file in
``sha256sum`` format (``cd DIR && sha256sum -c SHA256SUMS`` checks it without Python).
``models_registry/bundled/`` (the models ``scripts/serve.sh`` serves on a fresh clone) is one.

Exporting a name takes the versions its aliases point at, the ``NAME-ensemble`` group's aliased
versions, and everything those manifests reference (``teachers``, ensemble ``members``),
transitively, with the aliases that point at exported versions. Version numbers are kept, so
the references stay valid.

Importing adds only what the target lacks and never changes an existing model, version or
alias: a name absent from the target is added whole (exact versions, then its aliases, each
with a history line by ``import``); a name the target holds must hold every exported version
with the same manifest and bytes (then it is left as is, aliases included), otherwise the whole
import is refused before anything is written (:class:`ImportRefused` names the difference).
Both directions verify the checksums: export reads through the store's sha256 check and
verifies what it wrote; import verifies ``SHA256SUMS`` and each ONNX file against its manifest
first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models_registry.errors import IntegrityError, ModelNotFound, RegistryError
from models_registry.manifest import Manifest, check_name
from models_registry.store import (
    ALIASES_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    FilesystemStore,
)

SUMS_FILE = "SHA256SUMS"
ENSEMBLE_SUFFIX = "-ensemble"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
"""The export shipped with the code (``scripts/build_bundle.sh`` rebuilds it)."""
IMPORT_ACTOR = "import"


class ImportRefused(RegistryError):
    """The target registry holds a name of the export with different content."""


@dataclass
class ImportReport:
    """What an import did: names added (with their versions) and names already identical."""

    added: dict[str, list[int]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    skipped: str | None = None
    """Why nothing was looked at (``--if-empty`` on a registry holding models)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def select(store: FilesystemStore, names: Iterable[str]) -> dict[str, set[int]]:
    """The versions an export of ``names`` holds (see the module docstring)."""
    queue: list[tuple[str, int]] = []
    for name in names:
        check_name(name)
        versions = store.list_versions(name)  # ModelNotFound names it
        aliased = set(store.aliases(name).values())
        queue += [(name, v) for v in sorted(aliased or {versions[-1]})]
        group = name + ENSEMBLE_SUFFIX
        if group in store.list_models():
            queue += [(group, v) for v in sorted(set(store.aliases(group).values()))]
    selected: dict[str, set[int]] = {}
    while queue:
        name, version = queue.pop()
        if version in selected.setdefault(name, set()):
            continue
        manifest = store.manifest(name, version)
        selected[name].add(version)
        queue += [(r.name, r.version) for r in (*manifest.teachers, *manifest.members)]
    return selected


def _write_sums(root: Path) -> None:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != SUMS_FILE:
            lines.append(f"{_sha256_file(path)}  {rel}\n")
    (root / SUMS_FILE).write_text("".join(lines))


def verify_export(root: str | os.PathLike[str]) -> list[str]:
    """Problems with an export folder ([] when sound): a file missing from or unlisted in
    ``SHA256SUMS``, a checksum that differs, or what the store's ``verify`` finds (each ONNX file
    against its manifest's sha256, ensemble members present, aliases on existing versions)."""
    root = Path(root)
    sums = root / SUMS_FILE
    if not sums.is_file():
        return [f"{sums}: missing (not an export folder?)"]
    problems: list[str] = []
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            problems.append(f"{sums}:{number}: malformed line {line!r}")
            continue
        listed[rel] = digest
    present = {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
    } - {SUMS_FILE}
    for rel in sorted(set(listed) - present):
        problems.append(f"{rel}: listed in {SUMS_FILE} but missing")
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: not listed in {SUMS_FILE}")
    for rel in sorted(set(listed) & present):
        actual = _sha256_file(root / rel)
        if actual != listed[rel]:
            problems.append(f"{rel}: sha256 {actual} does not match {SUMS_FILE} ({listed[rel]})")
    problems += [str(p) for p in FilesystemStore(root).verify()]
    return problems


def export_models(
    store: FilesystemStore, names: Sequence[str], out: str | os.PathLike[str]
) -> dict[str, list[int]]:
    """Export ``names`` (and what they reference) from ``store`` into the new folder ``out``;
    returns the versions exported per name. ``out`` must not exist or be empty; the export is
    built beside it and renamed into place, so a failed one leaves nothing."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RegistryError(f"{out} exists and is not an empty folder")
    selected = select(store, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        for name, versions in sorted(selected.items()):
            for version in sorted(versions):
                manifest = store.manifest(name, version)
                folder = tmp / name / str(version)
                folder.mkdir(parents=True)
                if manifest.kind != "ensemble":
                    # Read through the store: it refuses bytes that do not match the manifest.
                    (folder / ONNX_FILE).write_bytes(store.onnx_bytes(name, version))
                (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
            aliases = {a: v for a, v in sorted(store.aliases(name).items()) if v in versions}
            if aliases:
                (tmp / name / ALIASES_FILE).write_text(_aliases_json(aliases))
        _write_sums(tmp)
        problems = verify_export(tmp)
        if problems:
            raise IntegrityError(str(out), "a sound export", "; ".join(problems))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: sorted(v) for name, v in sorted(selected.items())}


def _aliases_json(aliases: dict[str, int]) -> str:
    return json.dumps(dict(sorted(aliases.items())), indent=2) + "\n"


def _differences(source: FilesystemStore, target: FilesystemStore, name: str) -> list[str]:
    """Why ``target``'s ``name`` is not the exported one ([] when it holds every exported
    version with the same manifest, hence the same ONNX bytes)."""
    have = set(target.list_versions(name))
    out = []
    for version in source.list_versions(name):
        if version not in have:
            out.append(f"version {version} is not there (it has {sorted(have)})")
            continue
        mine, theirs = source.manifest(name, version), target.manifest(name, version)
        if mine != theirs:
            keys = sorted(
                k for k in Manifest.model_fields if getattr(mine, k) != getattr(theirs, k)
            )
            out.append(f"version {version} differs ({', '.join(keys)})")
    return out


def import_models(
    source: str | os.PathLike[str], store: FilesystemStore, *, if_empty: bool = False
) -> ImportReport:
    """Import the export folder ``source`` into ``store`` (see the module docstring).

    ``if_empty``: do nothing unless ``store`` holds no model (what ``scripts/serve.sh`` does).
    Raises ``IntegrityError`` if the export does not verify and :class:`ImportRefused` if a name
    exists with different content; in both cases nothing is written.
    """
    if if_empty and store.list_models():
        return ImportReport(skipped=f"{store.root} already holds models")
    problems = verify_export(source)
    if problems:
        raise IntegrityError(str(source), f"checksums as in {SUMS_FILE}", "; ".join(problems))
    export = FilesystemStore(source)
    names = export.list_models()
    if not names:
        raise RegistryError(f"{source} holds no model")
    present = set(store.list_models())
    report = ImportReport()
    refusals = []
    for name in names:
        if name not in present:
            continue
        diff = _differences(export, store, name)
        if diff:
            refusals.append(f"{name}: " + "; ".join(diff))
        else:
            report.kept.append(name)
    if refusals:
        raise ImportRefused(
            f"refusing to import {source} into {store.root}: already there with different "
            f"content: {' | '.join(refusals)}. Nothing was imported; import into another "
            "registry (--root) or remove those names from this one first."
        )
    missing = [n for n in names if n not in present]
    # Single models first: a group's members must exist before the group appears.
    missing.sort(key=lambda n: export.manifest(n, export.latest_version(n)).kind == "ensemble")
    for name in missing:
        versions = []
        for version in export.list_versions(name):
            manifest = export.manifest(name, version)
            onnx = None if manifest.kind == "ensemble" else export.onnx_bytes(name, version)
            versions.append((manifest, onnx))
        try:
            store.add_model(name, versions, export.aliases(name), actor=IMPORT_ACTOR)
        except ModelNotFound as exc:
            raise RegistryError(f"{name}: {exc} (the export is incomplete)") from exc
        report.added[name] = [m.version for m, _ in versions]
    return report


__all__ = [
    "BUNDLED_DIR",
    "ImportRefused",
    "ImportReport",
    "export_models",
    "import_models",
    "select",
    "verify_export",
]
