"""The model a batch job scores with, pinned once at submission.

`pin_model` resolves `NAME[@ALIAS|@VERSION]` for a mode by the service's rules
(docs/contracts.md, "How the service resolves a request's model"): fast -> the student, accurate ->
`NAME-ensemble` at the same selector, or the group recorded in a student version's `teachers`.
Every actor then loads exactly that version through `PinnedRegistry`, so a promotion made while a
nightly job runs cannot mix two versions in one output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from models_registry.cache import InProcessCache
from models_registry.errors import ModelNotFound, RegistryError
from models_registry.manifest import Manifest
from models_registry.registry import Registry
from models_registry.store import FilesystemStore, parse_ref
from service.batch import JobError
from service.core.errors import ServiceError
from service.core.intervals import Calibration
from service.core.pool import ENSEMBLE_SUFFIX

JobMode = Literal["fast", "accurate"]


@dataclass(frozen=True, slots=True)
class Target:
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def is_ensemble(self) -> bool:
        return self.manifest.kind == "ensemble"

    @property
    def mode(self) -> JobMode:
        """The request mode that serves exactly this version."""
        return "accurate" if self.is_ensemble else "fast"


def _resolve(store: FilesystemStore, ref: str) -> tuple[str, int]:
    try:
        return store.resolve(ref)
    except ModelNotFound as exc:
        raise JobError(f"--model: {exc}") from None


def _group_for_version(store: FilesystemStore, name: str, version: int) -> tuple[str, int]:
    """The ensemble a student version was distilled from (as `Predictor._group_for_version`)."""
    refs = {(t.name, t.version) for t in store.manifest(name, version).teachers}
    for ref_name, ref_version in sorted(refs):
        if store.manifest(ref_name, ref_version).kind == "ensemble":
            return ref_name, ref_version
    group = name + ENSEMBLE_SUFFIX
    if refs and group in store.list_models():
        for v in sorted(store.list_versions(group), reverse=True):
            members = store.manifest(group, v).members
            if {(m.name, m.version) for m in members} == refs:
                return group, v
    raise JobError(f"--model: {name}@{version} records no teacher ensemble in this registry")


def pin_model(store: FilesystemStore, ref: str, mode: JobMode) -> Target:
    """Resolve `ref` for `mode` now; JobError (a clear message) when the registry cannot."""
    try:
        name, selector = parse_ref(ref)
    except RegistryError as exc:
        raise JobError(f"--model: {exc}") from None
    if not store.root.is_dir():
        raise JobError(f"registry {store.root} does not exist (--registry)")
    try:
        kind = store.manifest(name, store.latest_version(name)).kind
    except ModelNotFound:
        known = ", ".join(store.list_models()) or "none"
        raise JobError(f"unknown model {name!r} in {store.root} (models: {known})") from None
    except RegistryError as exc:
        raise JobError(f"--model: {exc}") from None
    if kind == "teacher":
        raise JobError(f"{name} is a teacher: name the student (fast) or its ensemble (accurate)")
    if kind == "ensemble":
        if mode == "fast":
            raise JobError(
                f"{name} is a teacher ensemble: use --mode accurate, or name the student"
            )
        key = _resolve(store, ref)
    elif mode == "fast":
        key = _resolve(store, ref)
    elif isinstance(selector, int):
        _resolve(store, ref)
        key = _group_for_version(store, name, selector)
    else:
        group = name + ENSEMBLE_SUFFIX
        if group not in store.list_models():
            raise JobError(f"{name} has no teacher ensemble ({group}): use --mode fast")
        key = _resolve(store, group if selector is None else f"{group}@{selector}")
    return Target(store.manifest(*key))


def check_request(target: Target, horizon: int | None, levels: tuple[float, ...]) -> int:
    """The horizon to forecast; JobError for a horizon or level the model cannot serve (the
    same checks the Predictor makes per request, made once before any work starts)."""
    m = target.manifest
    h = m.horizon if horizon is None else horizon
    if h < 1 or h > m.horizon:
        raise JobError(f"--horizon {h}: {target.label} forecasts 1..{m.horizon} steps")
    if levels:
        calibration = Calibration.from_manifest(
            m.calibration.model_dump() if m.calibration else None
        )
        if calibration is None:
            raise JobError(f"--level: {target.label} has no calibration for intervals")
        try:
            calibration.check_levels(levels, h)
        except ServiceError as exc:
            raise JobError(f"--level: {exc.message}") from None
    return h


class PinnedRegistry(Registry):
    """The registry as one job sees it: a pinned name shows only its pinned version and no
    aliases, so the service's `ModelPool` loads that version and nothing else."""

    def __init__(self, store: FilesystemStore, pins: Mapping[str, int]) -> None:
        super().__init__(store, InProcessCache())
        self.pins = dict(pins)

    async def list_versions(self, name: str) -> list[int]:
        if name in self.pins:
            return [self.pins[name]]
        return await super().list_versions(name)

    async def aliases(self, name: str) -> dict[str, int]:
        if name in self.pins:
            return {}
        return await super().aliases(name)
