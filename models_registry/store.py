"""Filesystem store: the registry's source of truth.

Layout (docs/contracts.md)::

    <root>/.store-id                       random id; keys the cache so a recreated root never
                                           collides with entries cached for an older one
    <root>/<name>/<version>/model.onnx     immutable once the version directory exists
    <root>/<name>/<version>/manifest.json
    <root>/<name>/aliases.json             {"production": 3, "staging": 4, ...}
    <root>/<name>/history.jsonl            every alias change, appended (AliasChange lines)
    <root>/<name>/.lock                    per-model lock file (filelock)

Crash and concurrency safety rest on three rules:

* a version directory is built under a temporary name and renamed into place, so it appears
  complete or not at all;
* every file is written to a temporary name, fsynced, then `os.replace`d, and the parent directory
  fsynced, so a crash leaves the old or the new content, never a torn one;
* choosing a version number, moving aliases and deleting versions happen under the model's file
  lock, so two processes registering at once get distinct versions.

A new version goes on the `staging` alias. Moving `production` passes the promotion gate: the
candidate's validation MSE may not be worse than the current production's beyond a relative
tolerance, unless forced (`PromotionRefused` names both figures). The check runs under the model
lock, so every path (CLI, admin API, training pipeline) gets the same gate and history.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import filelock
from pydantic import ValidationError

from models_registry.defaults import (
    GATE_METRIC,
    GATED_ALIASES,
    STAGING_ALIAS,
    promotion_tolerance,
)
from models_registry.errors import (
    AliasNotFound,
    IntegrityError,
    InvalidName,
    ManifestError,
    ModelNotFound,
    PromotionRefused,
    RegistryError,
    StorageFull,
    VersionNotFound,
)
from models_registry.manifest import (
    DEFAULT_ALIAS,
    AliasChange,
    GateCheck,
    Manifest,
    ModelRef,
    check_alias,
    check_name,
    check_version,
)

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "history.jsonl"
STORE_ID_FILE = ".store-id"
_LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# A temporary directory older than this belongs to a writer that died; gc may remove it.
_STALE_TMP_SECONDS = 3600.0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_ref(ref: str) -> tuple[str, str | int | None]:
    """Split `"name"`, `"name@alias"` or `"name@3"` into (name, None | alias | version)."""
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if selector.isdigit():
        return name, check_version(int(selector))
    return name, check_alias(selector)


@dataclass(frozen=True)
class Problem:
    """One finding of `FilesystemStore.verify`."""

    name: str
    version: int | None
    message: str

    def __str__(self) -> str:
        where = self.name if self.version is None else f"{self.name}@{self.version}"
        return f"{where}: {self.message}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> None:
    # "xb": a name collision means a logic error, never silently overwrite.
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        _write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _append_line(path: Path, data: bytes) -> None:
    # O_APPEND: one write per line, so a crash tears at most the last line (history() skips it).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _space_for(what: str, root: Path) -> Iterator[None]:
    """ENOSPC/EDQUOT during `what` becomes `StorageFull`, naming the registry's filesystem (the
    callers roll back what they had written before re-raising)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(
                f"{what}: no space left on the registry's filesystem ({root}): nothing was "
                "changed; free space and retry"
            ) from exc
        raise


def check_gate(
    alias: str,
    candidate: Manifest,
    current: Manifest | None,
    tolerance: float,
    metric: str = GATE_METRIC,
) -> GateCheck | None:
    """Compare `candidate` with the version `alias` points at now (None: unset). Returns None
    for an ungated alias; otherwise the figures and whether the candidate passes: its `metric`
    (lower is better) at most `current * (1 + tolerance)`. Nothing to compare (no current
    version, or one without the metric) passes; a candidate without the metric against a current
    one that has it does not."""
    if alias not in GATED_ALIASES:
        return None
    cand = candidate.metrics.get(metric)
    if current is None or current.version == candidate.version:
        return GateCheck(metric=metric, candidate=cand, current=None, current_version=None,
                         tolerance=tolerance, passed=True)
    cur = current.metrics.get(metric)
    if cur is None:
        passed = True
    elif cand is None:
        passed = False
    else:
        passed = cand <= cur * (1.0 + tolerance)
    return GateCheck(metric=metric, candidate=cand, current=cur, current_version=current.version,
                     tolerance=tolerance, passed=passed)


class FilesystemStore:
    """Synchronous, process-safe model store rooted at `root` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> None:
        # Resolved once: every path handed out is checked to stay under this exact directory.
        self.root = Path(root).expanduser().resolve()
        self.lock_timeout = lock_timeout
        self._locks: dict[str, filelock.FileLock] = {}
        self._store_id: str | None = None

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    # -- paths and locks -------------------------------------------------------------------------

    def _inside(self, path: Path) -> Path:
        # resolve() follows symlinks, so a model directory symlinked elsewhere is caught too.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidName(f"path {path} escapes the registry root {self.root}")
        return path

    def model_dir(self, name: str) -> Path:
        return self._inside(self.root / check_name(name))

    def version_dir(self, name: str, version: int) -> Path:
        return self._inside(self.model_dir(name) / str(check_version(version)))

    def onnx_path(self, name: str, version: int) -> Path:
        return self._inside(self.version_dir(name, version) / ONNX_FILE)

    def _manifest_path(self, name: str, version: int) -> Path:
        return self._inside(self.version_dir(name, version) / MANIFEST_FILE)

    @contextlib.contextmanager
    def _lock(self, *names: str) -> Iterator[None]:
        """Hold the file locks of `names`, always taken in sorted order so lockers never deadlock.

        One FileLock object per path and process: filelock is reentrant per object and thread, and
        a second object on the same path in the same thread would block on itself.
        """
        with contextlib.ExitStack() as stack:
            for name in sorted(set(names)):
                model_dir = self.model_dir(name)
                model_dir.mkdir(parents=True, exist_ok=True)
                lock_path = str(model_dir / _LOCK_FILE)
                lock = self._locks.get(lock_path)
                if lock is None:
                    lock = self._locks.setdefault(
                        lock_path, filelock.FileLock(lock_path, timeout=self.lock_timeout)
                    )
                try:
                    stack.enter_context(lock)
                except filelock.Timeout as exc:
                    raise RegistryError(
                        f"timed out after {self.lock_timeout}s waiting for the lock of {name!r}"
                    ) from exc
            yield

    @property
    def store_id(self) -> str:
        """A random id stored in the root, created on first use."""
        if self._store_id is None:
            path = self.root / STORE_ID_FILE
            try:
                self._store_id = path.read_text().strip()
            except FileNotFoundError:
                try:
                    self._store_id = self._create_store_id(path)
                except OSError as exc:
                    # A read-only root that never had an id: derive one from its location, which
                    # is still unique per root (only recreating it in place is not detected).
                    log.warning(
                        "cannot create %s (%s); deriving the store id from the path", path, exc
                    )
                    self._store_id = sha256_hex(str(self.root).encode())[:32]
        return self._store_id

    def _create_store_id(self, path: Path) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.root / _LOCK_FILE), timeout=self.lock_timeout):
            if not path.exists():
                _atomic_write(path, uuid.uuid4().hex.encode())
            return path.read_text().strip()

    # -- reading ---------------------------------------------------------------------------------

    def _scan(self) -> tuple[list[str], list[Problem]]:
        """Model directories under the root, and the entries that cannot be models."""
        if not self.root.is_dir():
            return [], []
        names: list[str] = []
        strays: list[Problem] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                self.model_dir(entry.name)  # valid name, and stays inside the root
            except InvalidName as exc:
                strays.append(Problem(entry.name, None, f"not a model directory: {exc}"))
                continue
            names.append(entry.name)
        return names, strays

    def list_models(self) -> list[str]:
        """Names that have at least one registered version, sorted."""
        names, _ = self._scan()
        return [n for n in names if self._versions_in(self.root / n)]

    @staticmethod
    def _versions_in(model_dir: Path) -> list[int]:
        versions = []
        with contextlib.suppress(FileNotFoundError):
            for entry in model_dir.iterdir():
                # str(int(x)) == x refuses "007": one spelling per version.
                if entry.name.isdigit() and str(int(entry.name)) == entry.name:
                    versions.append(int(entry.name))
        return sorted(versions)

    def list_versions(self, name: str) -> list[int]:
        versions = self._versions_in(self.model_dir(name))
        if not versions:
            raise ModelNotFound(name)
        return versions

    def latest_version(self, name: str) -> int:
        return self.list_versions(name)[-1]

    def _missing(self, name: str, version: int) -> ModelNotFound:
        if not self._versions_in(self.model_dir(name)):
            return ModelNotFound(name)
        return VersionNotFound(name, version)

    def manifest(self, name: str, version: int) -> Manifest:
        path = self._manifest_path(name, version)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise self._missing(name, version) from None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ManifestError(f"{path}: invalid manifest: {exc}") from exc
        if manifest.name != name or manifest.version != version:
            raise ManifestError(
                f"{path}: manifest says {manifest.name}@{manifest.version}, "
                f"directory says {name}@{version}"
            )
        return manifest

    def onnx_bytes(self, name: str, version: int) -> bytes:
        """The ONNX bytes of a version, verified against the manifest's sha256."""
        manifest = self.manifest(name, version)
        if manifest.kind == "ensemble":
            raise RegistryError(f"{name}@{version} is an ensemble group: it has no {ONNX_FILE}")
        path = self.onnx_path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(str(path), manifest.sha256, "<file missing>") from None
        actual = sha256_hex(data)
        if actual != manifest.sha256:
            raise IntegrityError(str(path), manifest.sha256, actual)
        return data

    def aliases(self, name: str) -> dict[str, int]:
        model_dir = self.model_dir(name)
        path = self._inside(model_dir / ALIASES_FILE)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not self._versions_in(model_dir):
                raise ModelNotFound(name) from None
            return {}
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return {check_alias(str(k)): check_version(v) for k, v in data.items()}
        except (ValueError, InvalidName) as exc:
            raise ManifestError(f"{path}: invalid alias map: {exc}") from exc

    def resolve(self, ref: str) -> tuple[str, int]:
        """`"name"` (production alias, else latest), `"name@alias"` or `"name@3"` -> (name, v)."""
        name, selector = parse_ref(ref)
        if isinstance(selector, int):
            version = selector
        else:
            aliases = self.aliases(name)
            if selector is None:
                version = aliases.get(DEFAULT_ALIAS) or self.latest_version(name)
            elif selector in aliases:
                version = aliases[selector]
            else:
                raise AliasNotFound(name, selector)
        if not self._manifest_path(name, version).is_file():
            raise self._missing(name, version)
        return name, version

    # -- writing ---------------------------------------------------------------------------------

    def _check_kind(self, name: str, kind: str) -> None:
        # A name holds either ensemble groups or single models, never both: the service decides
        # how to load a name from its kind, and a promotion must not silently switch that.
        versions = self._versions_in(self.model_dir(name))
        if versions:
            existing = self.manifest(name, versions[-1]).kind
            if (existing == "ensemble") != (kind == "ensemble"):
                raise RegistryError(
                    f"{name!r} holds {existing!r} versions; cannot register a {kind!r} under it"
                )

    def _new_tmp_dir(self, model_dir: Path) -> Path:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        return tmp

    def _publish_version(self, name: str, tmp: Path, manifest: Manifest) -> Manifest:
        """Under the model lock: number the version, write its manifest, rename it into place."""
        model_dir = self.model_dir(name)
        versions = self._versions_in(model_dir)
        version = versions[-1] + 1 if versions else 1
        final = Manifest.model_validate(
            {
                **manifest.model_dump(),
                "version": version,
                "created_at": datetime.now(UTC),
            }
        )
        _write_new_file(tmp / MANIFEST_FILE, final.model_dump_json(indent=2).encode())
        _fsync_dir(tmp)
        # rename(2) of a directory is atomic and fails if the target exists: readers see the
        # version complete or not at all.
        os.rename(tmp, model_dir / str(version))
        _fsync_dir(model_dir)
        log.info("registered %s@%d (%s)", name, version, final.kind)
        self._write_alias(name, STAGING_ALIAS, version, actor="register", gate=None, forced=False)
        return final

    def register(self, manifest: Manifest, onnx_bytes: bytes) -> Manifest:
        """Store a new version; returns its manifest with version, sha256 and created_at set."""
        name = check_name(manifest.name)
        if manifest.kind == "ensemble":
            raise RegistryError("ensembles are registered with register_group()")
        if not onnx_bytes:
            raise RegistryError(f"refusing to register {name!r} with empty ONNX bytes")
        digest = sha256_hex(onnx_bytes)
        if manifest.sha256 is not None and manifest.sha256 != digest:
            raise IntegrityError(
                f"ONNX bytes passed to register({name!r})", manifest.sha256, digest
            )
        manifest = manifest.model_copy(update={"sha256": digest})
        with _space_for(f"registering a version of {name!r}", self.root):
            tmp = self._new_tmp_dir(self.model_dir(name))
            try:
                # The large write happens before taking the lock, so concurrent registrations
                # only serialise on numbering and renaming.
                _write_new_file(tmp / ONNX_FILE, onnx_bytes)
                with self._lock(name):
                    self._check_kind(name, manifest.kind)
                    return self._publish_version(name, tmp, manifest)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)

    def _member_manifests(self, members: Sequence[ModelRef]) -> list[Manifest]:
        manifests = []
        for member in members:
            m = self.manifest(member.name, member.version)
            if m.kind == "ensemble":
                raise RegistryError(f"ensemble member {member} is itself an ensemble")
            manifests.append(m)
        return manifests

    def register_group(self, name: str, members: Sequence[ModelRef], **fields: Any) -> Manifest:
        """Register an ensemble group: a manifest listing member versions, no model.onnx.

        `lookback`, `horizon` and `channels` default to the members' (which must agree); other
        manifest fields may be passed in `fields`.
        """
        check_name(name)
        members = [ModelRef.model_validate(m) for m in members]
        if not members:
            raise RegistryError("an ensemble group needs at least one member")
        for banned in ("name", "kind", "members", "version", "sha256", "created_at"):
            if banned in fields:
                raise TypeError(f"register_group() sets {banned!r} itself")
        self._member_manifests(members)  # fail fast, before creating anything
        tmp = self._new_tmp_dir(self.model_dir(name))
        try:
            # Member locks too: gc takes every lock, so it cannot delete a member between the
            # existence check below and the group becoming visible.
            with self._lock(name, *(m.name for m in members)):
                self._check_kind(name, "ensemble")
                manifests = self._member_manifests(members)
                derived = _group_shape(manifests)
                for key, value in derived.items():
                    if key in fields and fields[key] != value:
                        raise RegistryError(
                            f"{key}={fields[key]!r} disagrees with the members' {value!r}"
                        )
                try:
                    manifest = Manifest(
                        **{"architecture": "ensemble", **derived, **fields},
                        name=name,
                        kind="ensemble",
                        members=members,
                    )
                except ValidationError as exc:
                    raise RegistryError(f"invalid group manifest for {name!r}: {exc}") from exc
                return self._publish_version(name, tmp, manifest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def add_model(
        self,
        name: str,
        versions: Sequence[tuple[Manifest, bytes | None]],
        aliases: dict[str, int],
        *,
        actor: str = "import",
    ) -> None:
        """Add a model that this store does not hold, with the exact version numbers, manifests
        and aliases it had elsewhere (``models_registry.bundle`` imports an export this way).

        Refuses (``RegistryError``) if the name already has a version: an existing model is
        never changed. Each version appears whole (built under a temporary name, renamed), the
        ONNX bytes must match the manifest's sha256 and an ensemble's members must already be
        here; the aliases are written last, each with a history line by ``actor``.
        """
        check_name(name)
        if not versions:
            raise RegistryError(f"{name!r}: nothing to add")
        for alias, version in aliases.items():
            check_alias(alias)
            if version not in {m.version for m, _ in versions}:
                raise RegistryError(f"{name}@{alias} points at {version}, which is not added")
        members = {ref.name for m, _ in versions for ref in m.members}
        with self._lock(name, *members):
            model_dir = self.model_dir(name)
            if self._versions_in(model_dir):
                raise RegistryError(f"{name!r} already exists in {self.root}; it is left as is")
            for manifest, onnx in sorted(versions, key=lambda item: item[0].version):
                if manifest.name != name or manifest.version < 1:
                    raise RegistryError(
                        f"manifest {manifest.name}@{manifest.version} cannot be added as {name!r}"
                    )
                if manifest.kind == "ensemble":
                    self._member_manifests(manifest.members)
                elif onnx is None or sha256_hex(onnx) != manifest.sha256:
                    actual = "<missing>" if onnx is None else sha256_hex(onnx)
                    raise IntegrityError(f"{name}@{manifest.version} {ONNX_FILE}",
                                         manifest.sha256, actual)
                tmp = self._new_tmp_dir(model_dir)
                try:
                    if onnx is not None and manifest.kind != "ensemble":
                        _write_new_file(tmp / ONNX_FILE, onnx)
                    body = manifest.model_dump_json(indent=2).encode()
                    _write_new_file(tmp / MANIFEST_FILE, body)
                    _fsync_dir(tmp)
                    os.rename(tmp, model_dir / str(manifest.version))
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
                _fsync_dir(model_dir)
                log.info("added %s@%d (%s, by %s)", name, manifest.version, manifest.kind, actor)
            for alias, version in sorted(aliases.items()):
                self._write_alias(name, alias, version, actor=actor, gate=None, forced=False)

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        actor: str = "unknown",
        force: bool = False,
        tolerance: float | None = None,
    ) -> int | None:
        """Point `alias` at `version`; returns the version it pointed at before (None if unset).
        See `change_alias` for the checks, the gate and the history."""
        return self.change_alias(
            name, alias, version, actor=actor, force=force, tolerance=tolerance
        ).previous

    def change_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        actor: str = "unknown",
        force: bool = False,
        tolerance: float | None = None,
    ) -> AliasChange:
        """Point `alias` at `version` and append the change to the model's history.

        The version is checked first (its manifest parses, its bytes match the sha256, an
        ensemble's members exist): promoting a broken artifact should fail here, not in the
        service. A gated alias (`production`) then passes the promotion gate (`check_gate`,
        relative `tolerance`, default `$DISTILCAST_PROMOTION_TOLERANCE` or 1%): a worse version
        raises `PromotionRefused` naming both figures, unless `force`.
        """
        check_alias(alias)
        tol = promotion_tolerance(tolerance)
        with self._lock(name):
            manifest = self.manifest(name, version)
            if manifest.kind == "ensemble":
                self._member_manifests(manifest.members)
            else:
                self.onnx_bytes(name, version)
            current_version = self.aliases(name).get(alias)
            current = None
            if current_version is not None:
                try:
                    current = self.manifest(name, current_version)
                except ModelNotFound:
                    current = None  # an alias left on a deleted version: nothing to compare
            gate = check_gate(alias, manifest, current, tol)
            if gate is not None and not gate.passed and not force:
                assert gate.current is not None and gate.current_version is not None
                log.warning("promotion gate refused %s@%s -> %d: %s %s vs %s (version %d)",
                            name, alias, version, gate.metric, gate.candidate, gate.current,
                            gate.current_version)
                raise PromotionRefused(
                    name, alias, version, metric=gate.metric, candidate=gate.candidate,
                    current=gate.current, current_version=gate.current_version, tolerance=tol,
                )
            with _space_for(f"moving {name}@{alias} to {version}", self.root):
                change = self._write_alias(
                    name, alias, version, actor=actor, gate=gate,
                    forced=bool(force and gate is not None and not gate.passed),
                )
        log.info("alias %s@%s: %s -> %d (%s%s)", name, alias, change.previous, version, actor,
                 ", forced past the gate" if change.forced else "")
        return change

    def _write_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        actor: str,
        gate: GateCheck | None,
        forced: bool,
    ) -> AliasChange:
        """Under the model lock: write the new alias map under a temporary name, append the
        history line, then rename the map into place. Every write that can run out of space
        comes before the switch, so a full disk leaves the alias where it was (a rename takes no
        new blocks)."""
        aliases = self.aliases(name)
        previous = aliases.get(alias)
        aliases[alias] = version
        payload = json.dumps(dict(sorted(aliases.items())), indent=2).encode()
        change = AliasChange(
            time=datetime.now(UTC), name=name, alias=alias, previous=previous, version=version,
            actor=actor, forced=forced, gate=gate,
        )
        path = self.model_dir(name) / ALIASES_FILE
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
        try:
            _write_new_file(tmp, payload)
            _append_line(self.model_dir(name) / HISTORY_FILE, change.model_dump_json().encode())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return change

    def history(self, name: str) -> list[AliasChange]:
        """Every alias change of `name`, oldest first (a torn last line is skipped)."""
        model_dir = self.model_dir(name)
        path = self._inside(model_dir / HISTORY_FILE)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not self._versions_in(model_dir):
                raise ModelNotFound(name) from None
            return []
        out: list[AliasChange] = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(AliasChange.model_validate_json(line))
            except ValidationError as exc:
                log.warning("%s:%d: unreadable history line skipped: %s", path, number,
                            exc.errors()[0]["msg"])
        return out

    def verify(self, name: str | None = None) -> list[Problem]:
        """Check manifests, hashes, group members and aliases; returns what is wrong (or [])."""
        if name is not None and not self._versions_in(self.model_dir(name)):
            raise ModelNotFound(name)
        if name is not None:
            return list(self._verify_model(name))
        names, problems = self._scan()
        for model in names:
            problems.extend(self._verify_model(model))
        return problems

    def _verify_model(self, name: str) -> Iterator[Problem]:
        versions = self._versions_in(self.model_dir(name))
        for version in versions:
            try:
                manifest = self.manifest(name, version)
                if manifest.kind == "ensemble":
                    for member in manifest.members:
                        try:
                            self._member_manifests([member])
                        except RegistryError as exc:
                            yield Problem(name, version, f"member {member}: {exc}")
                else:
                    self.onnx_bytes(name, version)
            except RegistryError as exc:
                yield Problem(name, version, str(exc))
        try:
            aliases = self.aliases(name)
        except ModelNotFound:
            aliases = {}
        except RegistryError as exc:
            yield Problem(name, None, str(exc))
            return
        for alias, version in sorted(aliases.items()):
            if version not in versions:
                yield Problem(name, None, f"alias {alias!r} points at missing version {version}")

    def gc(self, keep: int, *, dry_run: bool = False) -> list[ModelRef]:
        """Delete all but the newest `keep` versions of each model; returns what was deleted.

        Never deleted: aliased versions, and members of any group version that survives (so
        neither an aliased group nor a kept one loses a member). The newest version always
        survives (`keep >= 1`), which also keeps version numbers from ever being reused.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        names, _ = self._scan()
        deleted: list[ModelRef] = []
        # Every lock, for the whole run: no alias may move and no group may be registered while
        # the protected set is computed and applied.
        with self._lock(*names):
            versions = {n: self._versions_in(self.model_dir(n)) for n in names}
            survivors: dict[str, set[int]] = {}
            for n, vs in versions.items():
                survivors[n] = set(vs[-keep:]) | set(self.aliases(n).values()) if vs else set()
            protected = {n: set(s) for n, s in survivors.items()}
            for n in names:
                for v in survivors[n]:
                    if v not in versions[n]:
                        continue
                    try:
                        manifest = self.manifest(n, v)
                    except RegistryError as exc:
                        # Its members are unknown, so deleting anything could break it.
                        raise RegistryError(f"gc aborted: {exc} (run verify)") from exc
                    for member in manifest.members:
                        protected.setdefault(member.name, set()).add(member.version)
            for n in names:
                for v in versions[n]:
                    if v in protected.get(n, set()):
                        continue
                    deleted.append(ModelRef(name=n, version=v))
                    if not dry_run:
                        self._delete_version(n, v)
                if not dry_run:
                    self._remove_stale_tmp(self.model_dir(n))
        for ref in deleted:
            log.info("gc %s %s", "would delete" if dry_run else "deleted", ref)
        return deleted

    def _delete_version(self, name: str, version: int) -> None:
        # Rename first so no reader ever sees a half-deleted version directory.
        trash = self.model_dir(name) / f"{_TRASH_PREFIX}{version}-{uuid.uuid4().hex}"
        os.rename(self.version_dir(name, version), trash)
        _fsync_dir(trash.parent)
        shutil.rmtree(trash)

    @staticmethod
    def _remove_stale_tmp(model_dir: Path) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in _entries(model_dir):
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        log.info("removing leftover %s", entry)
                        if entry.is_dir():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink()


def _entries(path: Path) -> Iterable[Path]:
    try:
        return list(path.iterdir())
    except FileNotFoundError:
        return []


def _group_shape(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The lookback/horizon/channels an ensemble inherits from its members (which must agree)."""
    shape: dict[str, Any] = {}
    for key in ("lookback", "horizon"):
        values = {getattr(m, key) for m in manifests}
        if len(values) != 1:
            raise RegistryError(f"ensemble members disagree on {key}: {sorted(values)}")
        shape[key] = values.pop()
    fixed = {m.channels for m in manifests if m.channels is not None}
    if len(fixed) > 1:
        raise RegistryError(f"ensemble members disagree on channels: {sorted(fixed)}")
    # Channel-independent members serve any count; one fixed member pins the group to its count.
    shape["channels"] = fixed.pop() if fixed else None
    return shape
