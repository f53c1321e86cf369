"""Where the registry lives unless told otherwise: one constant for every entry point."""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "DISTILCAST_REGISTRY_ROOT"
REDIS_ENV = "DISTILCAST_REDIS_URL"
DEFAULT_ROOT = "./var/registry"

STAGING_ALIAS = "staging"
"""Every newly registered version is put here; promotion moves a version on to production."""
GATED_ALIASES = frozenset({"production"})
"""Aliases whose moves pass the promotion gate (models_registry.gate)."""
GATE_METRIC = "val_mse"
TOLERANCE_ENV = "DISTILCAST_PROMOTION_TOLERANCE"
DEFAULT_TOLERANCE = 0.01
"""Relative: a candidate may be up to 1% worse than production on validation MSE."""


def registry_root(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$DISTILCAST_REGISTRY_ROOT``, else ``./var/registry``."""
    return Path(path or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def promotion_tolerance(value: float | None = None) -> float:
    """``value``, else ``$DISTILCAST_PROMOTION_TOLERANCE``, else 1%; must be >= 0."""
    if value is None:
        raw = os.environ.get(TOLERANCE_ENV)
        value = float(raw) if raw else DEFAULT_TOLERANCE
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"promotion tolerance must be >= 0, got {value!r}")
    return value


__all__ = [
    "DEFAULT_ROOT",
    "DEFAULT_TOLERANCE",
    "GATED_ALIASES",
    "GATE_METRIC",
    "REDIS_ENV",
    "ROOT_ENV",
    "STAGING_ALIAS",
    "TOLERANCE_ENV",
    "promotion_tolerance",
    "registry_root",
]
