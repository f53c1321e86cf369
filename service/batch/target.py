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
from service.core.modes import (
    FastOnEnsemble,
    NoEnsemble,
    ensemble_among,
    group_name,
    group_version_of,
    mode_of,
    no_group,
    route,
)

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
        return mode_of(self.manifest.kind)


def _resolve(store: FilesystemStore, ref: str) -> tuple[str, int]:
    try:
        return store.resolve(ref)
    except ModelNotFound as exc:
        raise JobError(f"--model: {exc}") from None


def _group_for_version(store: FilesystemStore, name: str, version: int) -> tuple[str, int]:
    """The ensemble a student version was distilled from (`service.core.modes`, as the
    Predictor reads it)."""
    teachers = [(t.name, t.version) for t in store.manifest(name, version).teachers]
    direct = ensemble_among(teachers, lambda ref: store.manifest(*ref).kind)
    if direct is not None:
        return direct
    group = group_name(name)
    if teachers and group in store.list_models():
        candidates = [
            (v, [(m.name, m.version) for m in store.manifest(group, v).members])
            for v in store.list_versions(group)
        ]
        found = group_version_of(teachers, candidates)
        if found is not None:
            return group, found
    raise JobError(f"--model: {no_group((name, version)).message}")


def pin_model(store: FilesystemStore, ref: str, mode: JobMode) -> Target:
    """Resolve `ref` for `mode` now (the service's rules, `service.core.modes.route`); JobError
    (a clear message) when the registry cannot."""
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
    try:
        r = route(name, kind, mode, selector, has_group=group_name(name) in store.list_models())
    except FastOnEnsemble:
        raise JobError(
            f"{name} is a teacher ensemble: use --mode accurate, or name the student"
        ) from None
    except NoEnsemble:
        raise JobError(f"{name} has no teacher ensemble ({group_name(name)}): use --mode fast"
                       ) from None
    except ServiceError as exc:
        raise JobError(f"--model: {exc.message}") from None
    key = _resolve(store, r.name if r.selector is None else f"{r.name}@{r.selector}")
    if r.by_teachers:
        key = _group_for_version(store, *key)
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
