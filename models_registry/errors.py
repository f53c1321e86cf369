"""Exceptions raised by the models registry.

Everything derives from `RegistryError`, so callers that only care about "the registry said no"
catch one class. The "not found" family shares the `ModelNotFound` base: the service maps all of
them to 404 in one place, while code that needs the detail can still tell them apart.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidName(RegistryError, ValueError):
    """A model name, alias or reference is malformed or would escape the registry root.

    `part` says which: "name" (a model name or reference), "alias" or "version"."""

    def __init__(self, message: str, *, part: str = "name") -> None:
        self.part = part
        super().__init__(message)


class ModelNotFound(RegistryError, LookupError):
    """No model (or group) of that name is registered."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(message or f"model {name!r} not found")


class VersionNotFound(ModelNotFound):
    """The model exists but not that version."""

    def __init__(self, name: str, version: int) -> None:
        self.version = version
        super().__init__(name, f"model {name!r} has no version {version}")


class AliasNotFound(ModelNotFound):
    """The model exists but the alias is not set."""

    def __init__(self, name: str, alias: str) -> None:
        self.alias = alias
        super().__init__(name, f"model {name!r} has no alias {alias!r}")


class IntegrityError(RegistryError):
    """Artifact bytes do not match the sha256 recorded in the manifest.

    `source` names what was read: a file path, or a cache key for bytes that came from Redis.
    """

    def __init__(self, source: str, expected: str | None, actual: str) -> None:
        self.source = source
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"integrity check failed for {source}: expected sha256 {expected}, got {actual}"
        )


class ManifestError(RegistryError):
    """A manifest.json or aliases.json on disk is unreadable or does not validate."""


class StorageFull(RegistryError):
    """The registry's filesystem ran out of space (or quota) during a write. What was being
    written is rolled back: no partial version is visible and the alias map is unchanged."""


class CacheUnavailable(RegistryError):
    """The cache backend cannot be reached; callers fall back to the filesystem."""


class PromotionRefused(RegistryError):
    """The promotion gate refused a version: its validation metric is worse than the current
    holder's beyond the tolerance (or it has none to compare). Pass ``force=True`` to override;
    the forced change is recorded in the model's alias history."""

    def __init__(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        metric: str,
        candidate: float | None,
        current: float,
        current_version: int,
        tolerance: float,
    ) -> None:
        self.name = name
        self.alias = alias
        self.version = version
        self.metric = metric
        self.candidate = candidate
        self.current = current
        self.current_version = current_version
        self.tolerance = tolerance
        shown = "missing" if candidate is None else f"{candidate:.6g}"
        super().__init__(
            f"refused to point {name}@{alias} at version {version}: its {metric} {shown} is "
            f"worse than version {current_version}'s {current:.6g} by more than the tolerance "
            f"({tolerance:.2%}); force the promotion to override"
        )
